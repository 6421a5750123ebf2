package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestMain doubles as the tool's child: the scenarios re-execute the
// running binary (here the test binary) with "-child=...".
func TestMain(m *testing.M) {
	if isChild(os.Args[1:]) {
		os.Exit(childMain(os.Args[1:]))
	}
	etcdtest.VerifyTestMain(m)
}

// TestSmoke runs every scenario at tiny sizes: each must complete, report
// its figures in the table and the JSON file, and leave no child behind.
// It asserts that the tool works, never how fast anything is. Scenario 7
// (conns) is left out: it builds the discoverd binary, and what it floods
// is tested by TestAgentSurvivesDescriptorExhaustion in package main.
func TestSmoke(t *testing.T) {
	out := filepath.Join(t.TempDir(), "bench.json")
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := []string{"-quick", "-json", out, "-run", "throughput,latency,heartbeat,fanout,failure,start,dns",
		"-duration", "100ms", "-latency-events", "20", "-heartbeat-ttl", "1s",
		"-fanout-subs", "20", "-fanout-rounds", "1", "-agent-kills", "1s:1"}
	if code := run(ctx, args, &stdout, &stderr); code != 0 {
		t.Fatalf("run exited %d\nstdout:\n%s\nstderr:\n%s", code, &stdout, &stderr)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("JSON report: %v", err)
	}
	if len(rep.Errors) > 0 {
		t.Fatalf("errors: %v", rep.Errors)
	}
	switch {
	case rep.Throughput == nil || len(rep.Throughput.Runs) != 2*len(throughputShapes):
		t.Errorf("throughput: %+v, want an agent and a raw etcd run per shape", rep.Throughput)
	case rep.Latency == nil || rep.Latency.Agent.N != 20 || rep.Latency.Etcd.N != 20:
		t.Errorf("latency: %+v, want 20 samples of each", rep.Latency)
	case rep.Heartbeat == nil || rep.Heartbeat.HeldAtEnd != rep.Heartbeat.Registrations:
		t.Errorf("heartbeat: %+v, want every registration held at the end", rep.Heartbeat)
	case rep.Fanout == nil || rep.Fanout.Latency.N != 20 || rep.Fanout.AgentWatches != 1:
		t.Errorf("fanout: %+v, want 20 samples and 1 watch", rep.Fanout)
	case rep.Failure == nil || rep.Failure.ClientKill.N != 2 || len(rep.Failure.AgentKill) != 1 || rep.Failure.AgentKill[0].N != 1:
		t.Errorf("failure: %+v, want 2 client kills and 1 agent kill", rep.Failure)
	case rep.Start == nil || rep.Start.Start.N != 1 || len(rep.Start.IdleRSS) != 1:
		t.Errorf("start: %+v, want 1 start", rep.Start)
	case rep.DNS == nil || rep.DNS.VisibleSameAgent.N != 10 || rep.DNS.VisibleOtherAgent.N != 10:
		t.Errorf("dns: %+v, want 10 samples of each visibility", rep.DNS)
	}
	for _, s := range []string{"1 throughput", "2 latency", "3 heartbeat", "4 fan-out", "5 failure", "6 start", "8 dns"} {
		if !strings.Contains(stdout.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, &stdout)
		}
	}
}

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		ok   bool
	}{
		{"defaults", nil, true},
		{"quick with an override", []string{"-quick", "-fanout-subs", "7"}, true},
		{"unknown scenario", []string{"-run", "nope"}, false},
		{"bad agent kills", []string{"-agent-kills", "10s"}, false},
		{"too many streams per conn", []string{"-fanout-subs", "100000", "-fanout-conns", "10"}, false},
		{"bad start mode", []string{"-start-mode", "x"}, false},
		{"stray argument", []string{"x"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parseFlags(tc.args, io.Discard)
			if (err == nil) != tc.ok {
				t.Fatalf("parseFlags(%q): %v", tc.args, err)
			}
			if tc.name == "quick with an override" && (cfg.FanoutSubs != 7 || cfg.LatencyEvents != quickConfig().LatencyEvents) {
				t.Fatalf("quick override: %+v", cfg)
			}
		})
	}
	if code := run(context.Background(), []string{"-run", "nope"}, io.Discard, io.Discard); code != 2 {
		t.Fatalf("bad flag: exit %d, want 2", code)
	}
}
