package dnsserver_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/miekg/dns"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/dnsserver"
)

// staticCache is a Cache over fixed instances: the fuzz target exercises
// the query path (parsing, answering, truncation), not the agent, whose
// cache the other tests use for real.
type staticCache map[string]*dnsserver.Service

func (c staticCache) Get(_ context.Context, name string) (*dnsserver.Service, bool, error) {
	if err := api.ValidateName(name); err != nil {
		return nil, false, err
	}
	if svc, ok := c[name]; ok {
		return svc, name == "stale", nil
	}
	if name == "down" {
		return nil, false, api.Errorf(api.CodeUnavailable, "store unreachable")
	}
	return dnsserver.Compile(name, nil, api.ServiceUpdate{}), false, nil
}

func (c staticCache) Len() int          { return len(c) }
func (c staticCache) Evictions() uint64 { return 0 }

func compiled(name string, addrs ...string) *dnsserver.Service {
	var us []api.ServiceUpdate
	for i, a := range addrs {
		us = append(us, api.ServiceUpdate{Name: name, Addr: a, Online: true, Created: uint(i + 1)})
	}
	var leader api.ServiceUpdate
	if len(us) > 0 {
		leader = us[0]
	}
	return dnsserver.Compile(name, us, leader)
}

// FuzzReply: whatever the query, the reply packs, fits the transport's
// size (the query's EDNS0 size over UDP, 512 bytes without, 64 KiB over
// TCP) and carries the query's id. The seed corpus (testdata/fuzz) holds
// a query of every name form and type, with and without EDNS0.
func FuzzReply(f *testing.F) {
	var big []string
	for i := range 300 {
		big = append(big, fmt.Sprintf("10.1.%d.%d:%d", i/250, i%250+1, 1000+i))
	}
	cache := staticCache{
		"web":   compiled("web", "10.0.0.1:80", "[fd00::1]:81", "db.example.com:5432"),
		"big":   compiled("big", big...),
		"host":  compiled("host", "h.example.com:1"),
		"stale": compiled("stale", "10.0.0.9:9"),
	}
	srv, err := dnsserver.Listen(dnsserver.Config{Addr: "127.0.0.1:0", Cache: cache, Logger: quiet()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	f.Fuzz(func(t *testing.T, query []byte, tcp bool) {
		req := new(dns.Msg)
		if err := req.Unpack(query); err != nil {
			return
		}
		resp, _ := srv.Reply(context.Background(), req, tcp)
		out, err := resp.Pack()
		if err != nil {
			t.Fatalf("reply to %v does not pack: %v\n%v", req, err, resp)
		}
		limit := dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil && opt.Version() == 0 {
			limit = min(max(int(opt.UDPSize()), dns.MinMsgSize), 65507)
		}
		if tcp {
			limit = dns.MaxMsgSize
		}
		if len(out) > limit {
			t.Fatalf("reply of %d bytes, more than %d:\n%v", len(out), limit, resp)
		}
		if resp.Id != req.Id || !resp.Response {
			t.Fatalf("reply id %d response %v to query %d", resp.Id, resp.Response, req.Id)
		}
	})
}
