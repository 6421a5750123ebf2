package discoverd_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// serverModules are module path prefixes that an application importing the
// client must not find in its module graph: the store clients, grpc and
// prometheus come with the server's module, never with the client's.
var serverModules = []string{
	"github.com/flynn/discoverd ", // the server's own module
	"github.com/flynn/discoverd@",
	"go.etcd.io/",
	"github.com/go-zookeeper/",
	"google.golang.org/grpc",
	"github.com/prometheus/",
	"go.opentelemetry.io/",
}

// TestClientModuleGraph: an application that imports the client, its
// balancer and dialer has none of the server's modules in its module graph
// (go mod graph) and builds. The application is a module of its own in a
// temporary directory, outside the workspace (GOWORK=off), that reaches
// the client, api and rpc modules of this checkout through replace
// directives, as it would reach their released versions.
func TestClientModuleGraph(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	app := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(app, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	const none = " v0.0.0-00010101000000-000000000000"
	write("go.mod", "module example.com/app\n\ngo 1.25.0\n\nrequire (\n"+
		"\tgithub.com/flynn/discoverd/api"+none+"\n"+
		"\tgithub.com/flynn/discoverd/client"+none+"\n"+
		"\tgithub.com/flynn/discoverd/rpc"+none+"\n)\n\nreplace (\n"+
		"\tgithub.com/flynn/discoverd/api => "+filepath.Join(root, "api")+"\n"+
		"\tgithub.com/flynn/discoverd/client => "+filepath.Join(root, "client")+"\n"+
		"\tgithub.com/flynn/discoverd/rpc => "+filepath.Join(root, "rpc")+"\n)\n")
	write("main.go", `package main

import (
	"fmt"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/balancer"
	"github.com/flynn/discoverd/client/dialer"
)

func main() {
	c, err := discoverd.NewClient()
	if err != nil {
		panic(err)
	}
	defer c.Close()
	set, err := c.NewServiceSet("api")
	if err != nil {
		panic(err)
	}
	fmt.Println(balancer.RoundRobin(set), dialer.NewHTTPClient(c))
}
`)
	// The go.sum entries the application needs are the client's.
	sum, err := os.ReadFile(filepath.Join(root, "client", "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	write("go.sum", string(sum))

	gocmd := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("go", args...)
		cmd.Dir = app
		// Offline: whatever the graph needs is in this checkout or the
		// module cache; a missing module is a failure, not a download.
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod", "GOPROXY=off", "GOTOOLCHAIN=local")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	graph := gocmd("mod", "graph")
	for _, line := range strings.Split(graph, "\n") {
		for _, edge := range strings.Fields(line) {
			for _, bad := range serverModules {
				if strings.HasPrefix(edge+" ", bad) {
					t.Errorf("the application's module graph has %s (%q)", edge, line)
				}
			}
		}
	}
	deps := gocmd("list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}", ".")
	for _, mod := range strings.Fields(deps) {
		if mod != "example.com/app" && !strings.HasPrefix(mod, "github.com/flynn/discoverd/") {
			t.Errorf("the application links module %s", mod)
		}
	}
	gocmd("build", "-o", filepath.Join(app, "app"), ".")
	if t.Failed() {
		t.Logf("go mod graph:\n%s", graph)
	}
}
