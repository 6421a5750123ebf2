package main

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestFlagsFromEnvironment(t *testing.T) {
	for _, tc := range []struct {
		name    string
		env     map[string]string
		args    []string
		check   func(*Main) bool
		wantErr string
	}{
		{"every flag has a variable", map[string]string{
			"DISCOVERD_BIND": "127.0.0.1:7", "DISCOVERD_DATA_DIR": "/d", "DISCOVERD_ETCD_CLIENT_ADDR": "127.0.0.1:8",
			"DISCOVERD_ETCD_PEER_ADDR": "127.0.0.1:9", "DISCOVERD_TTL": "30s", "DISCOVERD_EXTERNAL_IP": "10.3.3.3",
			"DISCOVERD_LOG_LEVEL": "warn", "DISCOVERD_LOG_FORMAT": "json", "DISCOVERD_STORE_TIMEOUT": "1m",
			"DISCOVERD_ETCD": "http://e:2379", "EXTERNAL_IP": "10.1.1.1",
		}, nil, func(m *Main) bool {
			return m.Bind == "127.0.0.1:7" && m.DataDir == "/d" && m.EtcdClientAddr == "127.0.0.1:8" &&
				m.EtcdPeerAddr == "127.0.0.1:9" && m.TTL == 30*time.Second && m.ExternalIP == "10.3.3.3" &&
				m.LogLevel == slog.LevelWarn && m.LogFormat == LogJSON && m.StoreTimeout == time.Minute &&
				reflect.DeepEqual(m.Etcd, []string{"http://e:2379"})
		}, ""},
		{"the flag wins", map[string]string{"DISCOVERD_TTL": "30s", "DISCOVERD_LOG_FORMAT": "json"},
			[]string{"-ttl", "5s", "-log-format", "text"}, func(m *Main) bool {
				return m.TTL == 5*time.Second && m.LogFormat == LogText
			}, ""},
		{"a store flag overrides the other store's variable", map[string]string{"DISCOVERD_ETCD": "http://e:2379"},
			[]string{"-zookeeper", "z:2181"}, func(m *Main) bool {
				return m.Etcd == nil && reflect.DeepEqual(m.ZooKeeper, []string{"z:2181"})
			}, ""},
		{"empty is unset", map[string]string{"DISCOVERD_BIND": ""}, nil, func(m *Main) bool { return m.Bind == "127.0.0.1:1111" }, ""},
		{"both store variables", map[string]string{"DISCOVERD_ETCD": "http://e:2379", "DISCOVERD_ZOOKEEPER": "z:2181"}, nil, nil, "mutually exclusive"},
		{"bad value names the variable", map[string]string{"DISCOVERD_STORE_TIMEOUT": "long"}, nil, nil,
			`invalid value "long" for DISCOVERD_STORE_TIMEOUT (flag -store-timeout)`},
		{"bad log format", nil, []string{"-log-format", "xml"}, nil, "want text or json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := NewMain()
			err := m.ParseFlags(tc.args, func(k string) string { return tc.env[k] }, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseFlags = %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseFlags: %v", err)
			}
			if !tc.check(m) {
				t.Fatalf("ParseFlags gave %+v", m)
			}
		})
	}
}

// TestHelpListsEveryFlag: the help names each agent flag with its
// variable and default.
func TestHelpListsEveryFlag(t *testing.T) {
	var out bytes.Buffer
	if err := NewMain().ParseFlags([]string{"-h"}, func(string) string { return "" }, &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	NewMain().flagSet(func(string) string { return "" }).VisitAll(func(f *flag.Flag) {
		if !strings.Contains(out.String(), "  -"+f.Name+" ") && !strings.Contains(out.String(), "  -"+f.Name+"\n") {
			t.Errorf("help lacks -%s", f.Name)
		}
		if !strings.Contains(out.String(), "env "+envName(f.Name)+")") {
			t.Errorf("help lacks %s", envName(f.Name))
		}
	})
	for _, c := range []string{"register", "services", "watch", "leader", "version", "help", "DISCOVERD "} {
		if !strings.Contains(out.String(), c) {
			t.Errorf("help lacks %q", c)
		}
	}
}
