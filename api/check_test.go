package api_test

import (
	"bytes"
	"encoding/gob"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
)

func TestCheckValidate(t *testing.T) {
	sec := func(n int) api.Duration { return api.Duration(time.Duration(n) * time.Second) }
	for _, tc := range []struct {
		name string
		c    api.Check
		ok   bool
	}{
		{"tcp", api.Check{TCP: "10.0.0.1:5432"}, true},
		{"http", api.Check{HTTP: "http://10.0.0.1:8080/healthz"}, true},
		{"https with port", api.Check{HTTP: "https://db.example:8443/h?x=1"}, true},
		{"every field", api.Check{TCP: "h:1", Interval: sec(30), Timeout: sec(30), Rise: 100, Fall: 1, DeregisterAfter: sec(60)}, true},
		{"grpc server", api.Check{GRPC: "10.0.0.1:50051"}, true},
		{"grpc service", api.Check{GRPC: "10.0.0.1:50051/pkg.Service"}, true},
		{"grpc without port", api.Check{GRPC: "10.0.0.1/pkg.Service"}, false},
		{"grpc control in service", api.Check{GRPC: "h:1/a\nb"}, false},
		{"grpc and tcp", api.Check{GRPC: "h:1", TCP: "h:1"}, false},
		{"no target", api.Check{}, false},
		{"both targets", api.Check{TCP: "h:1", HTTP: "http://h/"}, false},
		{"tcp without port", api.Check{TCP: "h"}, false},
		{"tcp port 0", api.Check{TCP: "h:0"}, false},
		{"ftp", api.Check{HTTP: "ftp://h/"}, false},
		{"no host", api.Check{HTTP: "http:///x"}, false},
		{"relative", api.Check{HTTP: "/healthz"}, false},
		{"credentials", api.Check{HTTP: "http://u:p@h/"}, false},
		{"long URL", api.Check{HTTP: "http://h/" + strings.Repeat("a", api.MaxCheckURLLen)}, false},
		{"bad UTF-8", api.Check{HTTP: "http://h/\xff"}, false},
		{"interval too short", api.Check{TCP: "h:1", Interval: api.Duration(time.Millisecond)}, false},
		{"interval too long", api.Check{TCP: "h:1", Interval: api.Duration(2 * time.Hour)}, false},
		{"negative interval", api.Check{TCP: "h:1", Interval: -sec(1)}, false},
		{"timeout over interval", api.Check{TCP: "h:1", Interval: sec(2), Timeout: sec(3)}, false},
		{"timeout too short", api.Check{TCP: "h:1", Timeout: api.Duration(time.Microsecond)}, false},
		{"negative rise", api.Check{TCP: "h:1", Rise: -1}, false},
		{"fall too large", api.Check{TCP: "h:1", Fall: api.MaxCheckCount + 1}, false},
		{"deregister too soon", api.Check{TCP: "h:1", DeregisterAfter: sec(59)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkValid(t, tc.c.Validate(), tc.ok)
		})
	}
}

func TestCheckDefaults(t *testing.T) {
	for _, tc := range []struct {
		interval, timeout time.Duration
	}{
		{0, 5 * time.Second}, // default interval 10 s: min(5 s, 5 s)
		{4 * time.Second, 2 * time.Second},
		{time.Minute, 5 * time.Second},
	} {
		c := api.Check{TCP: "h:1", Interval: api.Duration(tc.interval)}.WithDefaults()
		if time.Duration(c.Timeout) != tc.timeout || c.Rise != 2 || c.Fall != 3 || c.DeregisterAfter != 0 {
			t.Errorf("interval %v: defaults %+v, want timeout %v, rise 2, fall 3", tc.interval, c, tc.timeout)
		}
	}
	if c := (api.Check{TCP: "h:1"}).WithDefaults(); time.Duration(c.Interval) != 10*time.Second {
		t.Errorf("default interval %v", c.Interval)
	}
}

func TestCheckJSON(t *testing.T) {
	var c api.Check
	in := `{"http":"http://h/","interval":"1m30s","timeout":"2s","rise":1,"fall":5,"deregister_after":"10m0s"}`
	if err := json.Unmarshal([]byte(in), &c); err != nil {
		t.Fatal(err)
	}
	want := api.Check{HTTP: "http://h/", Interval: api.Duration(90 * time.Second), Timeout: api.Duration(2 * time.Second),
		Rise: 1, Fall: 5, DeregisterAfter: api.Duration(10 * time.Minute)}
	if c != want {
		t.Fatalf("decoded %+v, want %+v", c, want)
	}
	out, err := json.Marshal(c)
	if err != nil || string(out) != in {
		t.Fatalf("encoded %s %v, want %s", out, err, in)
	}
	if err := json.Unmarshal([]byte(`{"tcp":"h:1","interval":10}`), &c); err == nil {
		t.Fatal("a number accepted as a duration")
	}
}

// TestArgsCheckGob: a Check crosses gob, and peers that predate it (the
// Args of go-discoverd: Name, Addr, Attrs) decode new Args and are
// decoded by new ones.
func TestArgsCheckGob(t *testing.T) {
	type oldArgs struct {
		Name  string
		Addr  string
		Attrs map[string]string
	}
	roundTrip := func(in, out any) {
		t.Helper()
		var buf bytes.Buffer
		if err := gob.NewEncoder(&buf).Encode(in); err != nil {
			t.Fatal(err)
		}
		if err := gob.NewDecoder(&buf).Decode(out); err != nil {
			t.Fatal(err)
		}
	}
	c := &api.Check{TCP: "h:1", Interval: api.Duration(time.Minute), Rise: 4}
	var got api.Args
	roundTrip(&api.Args{Name: "db", Addr: "h:1", Check: c}, &got)
	if got.Check == nil || *got.Check != *c {
		t.Fatalf("check after gob: %+v", got.Check)
	}
	var old oldArgs
	roundTrip(&api.Args{Name: "db", Addr: "h:1", Attrs: map[string]string{"k": "v"}, Check: c}, &old)
	if old.Name != "db" || old.Attrs["k"] != "v" {
		t.Fatalf("an old peer decoded %+v", old)
	}
	got = api.Args{}
	roundTrip(&oldArgs{Name: "db", Addr: "h:1"}, &got)
	if got.Name != "db" || got.Check != nil {
		t.Fatalf("decoded from an old peer: %+v", got)
	}
}

// FuzzValidateCheck checks that validation never panics, that what it
// accepts has exactly one target and sane defaults, and that an accepted
// check survives a JSON round trip.
func FuzzValidateCheck(f *testing.F) {
	f.Add("http://10.0.0.1:8080/healthz", "", int64(10e9), int64(0), 2, 3, int64(0))
	f.Add("", "10.0.0.1:5432", int64(0), int64(0), 0, 0, int64(60e9))
	f.Add("http://h/", "h:1", int64(-1), int64(-1), -1, -1, int64(-1))
	f.Add("ftp://\xff", "[::1]:0", int64(1e6), int64(1e12), 101, 0, int64(59e9))
	f.Fuzz(func(t *testing.T, httpURL, tcp string, interval, timeout int64, rise, fall int, deregister int64) {
		c := api.Check{HTTP: httpURL, TCP: tcp, Interval: api.Duration(interval), Timeout: api.Duration(timeout),
			Rise: rise, Fall: fall, DeregisterAfter: api.Duration(deregister)}
		err := c.Validate()
		if err != nil {
			if api.ErrorCode(err) != api.CodeInvalidArgument {
				t.Fatalf("error %v has code %q", err, api.ErrorCode(err))
			}
			return
		}
		if n := len(c.Kind()); n == 0 || (c.HTTP != "") && (c.TCP != "" || c.GRPC != "") || c.TCP != "" && c.GRPC != "" {
			t.Fatalf("accepted %+v without exactly one target", c)
		}
		d := c.WithDefaults()
		if d.Interval <= 0 || d.Timeout <= 0 || d.Timeout > d.Interval || d.Rise < 1 || d.Fall < 1 {
			t.Fatalf("accepted %+v with defaults %+v", c, d)
		}
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		var back api.Check
		if err := json.Unmarshal(b, &back); err != nil || back != c {
			t.Fatalf("JSON round trip: %+v -> %s -> %+v (%v)", c, b, back, err)
		}
	})
}
