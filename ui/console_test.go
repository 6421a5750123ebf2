package ui_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/checks"
	"github.com/flynn/discoverd/internal/testkit"
	"github.com/flynn/discoverd/server"
	"github.com/flynn/discoverd/ui"
)

var screenshot = flag.String("ui.screenshot", "", "write a screenshot of the console's first page to this PNG file (docs/console.png)")

func TestMain(m *testing.M) { etcdtest.VerifyTestMain(m) }

// waitTimeout bounds every wait for something that must happen; it is a
// guard against a hang, not a measure of speed.
const waitTimeout = 15 * time.Second

// The console's files stay small and self-contained: under 200 KB in all,
// and no reference to another origin.
func TestFilesSelfContained(t *testing.T) {
	var total int64
	files := ui.Files()
	for _, name := range []string{"index.html", "console.css", "console.js"} {
		b, err := fs.ReadFile(files, name)
		if err != nil {
			t.Fatal(err)
		}
		total += int64(len(b))
		for _, bad := range []string{"http://", "https://", "//fonts.", "innerHTML"} {
			if strings.Contains(string(b), bad) {
				t.Errorf("%s contains %q: the console must load nothing from elsewhere and build no markup from strings", name, bad)
			}
		}
	}
	if total > 200<<10 {
		t.Errorf("the console is %d bytes, over 200 KB", total)
	}
}

// env is an agent on a one-member etcd cluster (so that the store can be
// stopped), served behind a token gate that a test may close.
type env struct {
	url     string
	http    *httptest.Server
	cluster *etcdtest.Cluster
	token   atomic.Pointer[string] // non-nil: the token the gate wants
}

func newEnv(t *testing.T) *env {
	t.Helper()
	cluster := etcdtest.NewCluster(t, 1)
	log := slog.New(slog.NewTextHandler(tbWriter{t}, &slog.HandlerOptions{Level: slog.LevelError}))
	const ttl = 10 * time.Minute // longer than the test: HTTP registrations, which live a TTL after their PUT, do not expire
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: cluster.Endpoints(), TTL: ttl, Logger: log})
	if err != nil {
		t.Fatalf("etcd.Open: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	a, err := agent.New(agent.Config{Backend: b, TTL: ttl, Logger: log})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	m, err := checks.New(checks.Config{Registrar: a.NewKeptSession(), Logger: log}) // in memory
	if err != nil {
		t.Fatalf("checks.New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	conns := &server.ConnLimiter{Max: 64}
	srv, err := server.New(a, server.Options{
		Services: b, TTL: ttl, Conns: conns, Store: "etcd " + strings.Join(cluster.Endpoints(), ","),
		HealthTimeout: 500 * time.Millisecond, Logger: log, Checks: m,
	})
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	e := &env{cluster: cluster}
	e.http = httptest.NewUnstartedServer(e.gate(srv))
	e.http.Listener = conns.Listen(e.http.Listener)
	e.http.Start()
	t.Cleanup(e.http.Close)
	t.Cleanup(func() { srv.Close() })
	e.url = e.http.URL
	return e
}

// gate stands in for the agent's ACLs: while a token is required, every
// request but the console's own files needs it, as a discoverd_token
// cookie or a Bearer header: 401 without one, 403 with another.
func (e *env) gate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		want := e.token.Load()
		if want == nil || strings.HasPrefix(r.URL.Path, ui.Prefix) {
			next.ServeHTTP(w, r)
			return
		}
		got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if c, err := r.Cookie("discoverd_token"); err == nil && got == "" {
			got = c.Value
		}
		w.Header().Set("Content-Type", "application/json")
		switch got {
		case *want:
			next.ServeHTTP(w, r)
		case "":
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"error":"a token is required","code":"unauthenticated"}`)
		default:
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"error":"the token may not read this","code":"permission_denied"}`)
		}
	})
}

func (e *env) do(t *testing.T, method, path, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, e.url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func (e *env) mustPut(t *testing.T, name, addr, attrs string) {
	t.Helper()
	if resp := e.do(t, http.MethodPut, "/services/"+name+"/instances/"+addr, `{"attrs":{`+attrs+`}}`); resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("PUT %s %s: %d %s", name, addr, resp.StatusCode, b)
	}
}

// mustPutChecked registers addr of name with a TCP check of target,
// every second, online after 1 pass and offline after 1 failure.
func (e *env) mustPutChecked(t *testing.T, name, addr, target string) {
	t.Helper()
	body := fmt.Sprintf(`{"attrs":{"kind":"checked"},"check":{"tcp":%q,"interval":"1s","rise":1,"fall":1}}`, target)
	if resp := e.do(t, http.MethodPut, "/services/"+name+"/instances/"+addr, body); resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("PUT %s %s with a check: %d %s", name, addr, resp.StatusCode, b)
	}
}

func (e *env) mustDelete(t *testing.T, name, addr string) {
	t.Helper()
	if resp := e.do(t, http.MethodDelete, "/services/"+name+"/instances/"+addr, ""); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE %s %s: %d", name, addr, resp.StatusCode)
	}
}

// sseStreams returns the SSE streams the agent serves now (GET /agent).
func (e *env) sseStreams(t *testing.T) int {
	t.Helper()
	var info server.AgentInfo
	if err := json.NewDecoder(e.do(t, http.MethodGet, "/agent", "").Body).Decode(&info); err != nil {
		t.Fatal(err)
	}
	return info.SSEStreams
}

// created returns the Created of name's instance addr.
func (e *env) created(t *testing.T, name, addr string) uint {
	t.Helper()
	var list []server.Instance
	if err := json.NewDecoder(e.do(t, http.MethodGet, "/services/"+name, "").Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		if in.Addr == addr {
			return in.Created
		}
	}
	t.Fatalf("%s has no instance %s (%+v)", name, addr, list)
	return 0
}

// browser is one headless Chromium tab, with what its pages reported as
// errors.
type browser struct {
	ctx   context.Context
	loads int // pages opened, for open's unique queries

	mu      sync.Mutex
	errs    []string // exceptions, console.error, other error entries
	netErrs []string // failed loads (401, a cut connection)
}

// chromium returns the browser's path, skipping t when there is none,
// unless CI=true, where it must be installed.
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is not installed (required under CI): apt-get install chromium")
	}
	t.Skip("chromium is not installed; apt-get install chromium")
	return ""
}

func newBrowser(t *testing.T) *browser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, // CI runs as root
		chromedp.WindowSize(1280, 760),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc() // waits for the browser to exit
	})
	b := &browser{ctx: ctx}
	chromedp.ListenTarget(ctx, func(ev any) {
		var msg string
		network := false
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			msg = "exception: " + ev.ExceptionDetails.Error()
		case *runtime.EventConsoleAPICalled:
			if ev.Type != runtime.APITypeError && ev.Type != runtime.APITypeAssert {
				return
			}
			var parts []string
			for _, a := range ev.Args {
				parts = append(parts, string(a.Value)+a.Description)
			}
			msg = "console." + string(ev.Type) + ": " + strings.Join(parts, " ")
		case *cdplog.EventEntryAdded:
			if ev.Entry.Level != cdplog.LevelError {
				return
			}
			msg = fmt.Sprintf("%s: %s %s", ev.Entry.Source, ev.Entry.Text, ev.Entry.URL)
			network = ev.Entry.Source == cdplog.SourceNetwork
		default:
			return
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		if network {
			b.netErrs = append(b.netErrs, msg)
		} else {
			b.errs = append(b.errs, msg)
		}
	})
	if err := chromedp.Run(ctx); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return b
}

// check fails t if the pages reported errors since the last check;
// failed loads count only unless netOK (a test that cuts connections or
// wants a 401 on purpose).
func (b *browser) check(t *testing.T, netOK bool) {
	t.Helper()
	b.mu.Lock()
	errs, netErrs := b.errs, b.netErrs
	b.errs, b.netErrs = nil, nil
	b.mu.Unlock()
	if !netOK {
		errs = append(errs, netErrs...)
	}
	for _, e := range errs {
		t.Errorf("browser console: %s", e)
	}
}

func (b *browser) run(t *testing.T, what string, actions ...chromedp.Action) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, waitTimeout)
	defer cancel()
	if err := chromedp.Run(ctx, actions...); err != nil {
		t.Fatalf("%s: %v\npage text:\n%s", what, err, b.text())
	}
}

// open loads url as a new document: a query of its own makes each load a
// full navigation, never a same-document hash change, which Navigate
// would wait on forever.
func (b *browser) open(t *testing.T, url string) {
	t.Helper()
	b.loads++
	path, frag, _ := strings.Cut(url, "#")
	full := fmt.Sprintf("%s?load=%d", path, b.loads)
	if frag != "" {
		full += "#" + frag
	}
	b.run(t, "open "+full, chromedp.Navigate(full))
}

// openService opens the page of service name and waits for its streams
// to be live.
func (b *browser) openService(t *testing.T, e *env, name string) {
	t.Helper()
	b.open(t, e.url+"/ui/#/services/"+name)
	b.wait(t, "the stream to be live", `document.getElementById("stream-status").textContent === "Live."`)
}

// wait polls the page until the JavaScript expression cond is true.
func (b *browser) wait(t *testing.T, what, cond string) {
	t.Helper()
	var ok bool
	b.inPage(t, "wait for "+what, chromedp.Poll("!!("+cond+")", &ok,
		chromedp.WithPollingInterval(20*time.Millisecond), chromedp.WithPollingTimeout(waitTimeout)))
}

func (b *browser) eval(t *testing.T, expr string, res any) {
	t.Helper()
	b.inPage(t, "evaluate "+expr, chromedp.Evaluate(expr, res))
}

// inPage runs a in the page, again if it lost a race with the page's new
// document (under load, chromedp may still name the execution context of
// the document just replaced). a must be safe to repeat.
func (b *browser) inPage(t *testing.T, what string, a chromedp.Action) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, waitTimeout)
	defer cancel()
	for {
		err := chromedp.Run(ctx, a)
		if err == nil {
			return
		}
		if !strings.Contains(err.Error(), "Cannot find context with specified id") {
			t.Fatalf("%s: %v\npage text:\n%s", what, err, b.text())
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v\npage text:\n%s", what, err, b.text())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (b *browser) text() string {
	ctx, cancel := context.WithTimeout(b.ctx, 2*time.Second)
	defer cancel()
	var s string
	_ = chromedp.Run(ctx, chromedp.Evaluate(`document.body ? document.body.innerText : ""`, &s))
	return s
}

// markPage tags the current document; unmarked reports whether it was
// replaced (reloaded) since.
const (
	markPage  = `window.__notReloaded = true`
	unreloded = `window.__notReloaded === true`
)

// js quotes s as a JavaScript string.
func js(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// rowText is the text of the first row matching selector, "" if none.
func rowText(selector string) string {
	return `((document.querySelector(` + js(selector) + `) || {}).innerText || "")`
}

// TestConsole drives the console in one headless Chromium against a real
// agent: each subtest loads a page, acts through the agent's HTTP API
// and waits for the page to follow without a reload.
func TestConsole(t *testing.T) {
	b := newBrowser(t)
	e := newEnv(t)
	e.mustPut(t, "web", "10.0.0.1:8080", `"version":"2"`)
	e.mustPut(t, "web", "10.0.0.2:8080", `"version":"2"`)
	e.mustPut(t, "db", "10.0.1.1:5432", `"role":"primary"`)

	t.Run("first page lists every service and the agent", func(t *testing.T) {
		b.open(t, e.url+"/ui/")
		webToken := e.created(t, "web", "10.0.0.1:8080")
		b.wait(t, "web with 2 of 2 instances and its leader",
			rowText(`tr[data-service="web"]`)+fmt.Sprintf(`.match(/web\s+2 \/ 2\s+10\.0\.0\.1:8080\s+≥ \d+ s\s+%d\s/)`, webToken))
		b.wait(t, "db listed", rowText(`tr[data-service="db"]`)+`.includes("10.0.1.1:5432")`)
		b.wait(t, "the agent panel", `document.getElementById("a-health").textContent === "ok" &&
			document.getElementById("a-regs").textContent === "3" &&
			document.getElementById("a-session").textContent.startsWith("live") &&
			document.getElementById("a-ttl").textContent === "600 s" &&
			document.getElementById("a-store").textContent.startsWith("etcd http://")`)

		b.eval(t, markPage, nil)
		e.mustPut(t, "api", "10.0.2.1:9000", "")
		b.wait(t, "a new service to appear", rowText(`tr[data-service="api"]`)+`.includes("1 / 1")`)
		e.mustPut(t, "web", "10.0.0.3:8080", "")
		b.wait(t, "web's count to follow, with a change just now",
			rowText(`tr[data-service="web"]`)+`.match(/3 \/ 3.*\t\d+ s ago$/)`)
		e.mustDelete(t, "api", "10.0.2.1:9000")
		b.wait(t, "api to go", `!document.querySelector('tr[data-service="api"]')`)
		b.wait(t, "no reload", unreloded)
		e.mustDelete(t, "web", "10.0.0.3:8080")
		b.check(t, false)
	})

	t.Run("a registration shows on the service page without reload", func(t *testing.T) {
		b.openService(t, e, "web")
		b.wait(t, "the snapshot", rowText(`tr[data-addr="10.0.0.2:8080"]`)+`.includes("version=2")`)
		b.eval(t, markPage, nil)
		e.mustPut(t, "web", "10.0.0.9:8080", `"zone":"b"`)
		start := time.Now()
		b.wait(t, "the new instance", rowText(`tr[data-addr="10.0.0.9:8080"]`)+`.includes("zone=b")`)
		t.Logf("the instance showed %v after its PUT returned", time.Since(start))
		b.wait(t, "no reload", unreloded)
		b.wait(t, "the change log", `document.getElementById("log").innerText.includes("10.0.0.9:8080 online")`)
		b.check(t, false)
	})

	t.Run("an unregistration removes the instance", func(t *testing.T) {
		e.mustPut(t, "web", "10.0.0.9:8080", `"zone":"b"`) // registered already, unless run alone
		b.openService(t, e, "web")
		b.wait(t, "the instance", rowText(`tr[data-addr="10.0.0.9:8080"]`)+`!== ""`)
		b.eval(t, markPage, nil)
		e.mustDelete(t, "web", "10.0.0.9:8080")
		b.wait(t, "the row to go", `!document.querySelector('tr[data-addr="10.0.0.9:8080"]')`)
		b.wait(t, "the change log", `document.getElementById("log").innerText.includes("10.0.0.9:8080 offline")`)
		b.wait(t, "no reload", unreloded)
		b.check(t, false)
	})

	t.Run("a leader change moves the highlight and the token", func(t *testing.T) {
		first, second := e.created(t, "web", "10.0.0.1:8080"), e.created(t, "web", "10.0.0.2:8080")
		b.openService(t, e, "web")
		b.eval(t, markPage, nil)
		b.wait(t, "the first leader highlighted", fmt.Sprintf(`(() => {
			const rows = document.querySelectorAll("#instances-table tr.leader");
			return rows.length === 1 && rows[0].dataset.addr === "10.0.0.1:8080" &&
				rows[0].innerText.includes("leader") &&
				document.getElementById("leader-token").textContent === "%d";
		})()`, first))
		e.mustDelete(t, "web", "10.0.0.1:8080")
		b.wait(t, "the highlight and token to move", fmt.Sprintf(`(() => {
			const rows = document.querySelectorAll("#instances-table tr.leader");
			return rows.length === 1 && rows[0].dataset.addr === "10.0.0.2:8080" &&
				document.getElementById("leader-addr").textContent === "10.0.0.2:8080" &&
				document.getElementById("leader-token").textContent === "%d" &&
				document.getElementById("leader-age").textContent.match(/^\d+ s$/);
		})()`, second))
		b.wait(t, "the change log", fmt.Sprintf(`document.getElementById("log").innerText.includes("Leader: 10.0.0.2:8080, fencing token %d")`, second))
		b.wait(t, "no reload", unreloded)
		e.mustPut(t, "web", "10.0.0.1:8080", `"version":"2"`) // back, as a follower
		b.wait(t, "the returning instance", rowText(`tr[data-addr="10.0.0.1:8080"]`)+`!== ""`)
		b.check(t, false)
	})

	t.Run("a lost stream reconnects and says so", func(t *testing.T) {
		b.openService(t, e, "web")
		b.eval(t, markPage, nil)
		e.http.CloseClientConnections()
		b.wait(t, "the page to say it reconnected", `document.getElementById("stream-status").textContent.startsWith("Live (reconnected at")`)
		b.wait(t, "the change log", `document.getElementById("log").innerText.includes("Stream reconnected")`)
		e.mustPut(t, "web", "10.0.0.4:8080", "")
		b.wait(t, "a change after the reconnection", rowText(`tr[data-addr="10.0.0.4:8080"]`)+`!== ""`)
		b.wait(t, "no reload", unreloded)
		e.mustDelete(t, "web", "10.0.0.4:8080")
		b.check(t, true) // the cut connections failed loads
	})

	t.Run("keyboard: a service link opens its page and focuses its heading", func(t *testing.T) {
		b.open(t, e.url+"/ui/")
		b.wait(t, "the db link", `!!document.querySelector('tr[data-service="db"] a')`)
		b.eval(t, `document.querySelector('tr[data-service="db"] a').focus()`, nil)
		b.run(t, "press Enter", chromedp.KeyEvent("\r"))
		b.wait(t, "the service page, focused", `location.hash === "#/services/db" &&
			document.activeElement.id === "service-h" && document.activeElement.textContent === "Service db"`)
		b.wait(t, "db's instance", rowText(`tr[data-addr="10.0.1.1:5432"]`)+`.includes("role=primary")`)
		b.check(t, false)
	})

	t.Run("leaving a service page closes its streams", func(t *testing.T) {
		b.openService(t, e, "db")
		if n := e.sseStreams(t); n != 2 {
			t.Fatalf("the agent serves %d SSE streams, want the page's 2", n)
		}
		b.run(t, "leave", chromedp.Navigate("about:blank"))
		deadline := time.After(waitTimeout)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for e.sseStreams(t) != 0 {
			select {
			case <-deadline:
				t.Fatalf("the agent still serves %d SSE streams after the page left", e.sseStreams(t))
			case <-tick.C:
			}
		}
	})

	t.Run("markup: headers, scopes and labels", func(t *testing.T) {
		for _, page := range []string{"/ui/", "/ui/#/services/web"} {
			b.open(t, e.url+page)
			b.wait(t, "the page to fill", `document.querySelectorAll("tr[data-service], tr[data-addr]").length >= 2`)
			var problems []string
			b.eval(t, `(() => {
				const p = [];
				for (const th of document.querySelectorAll("th")) if (!th.getAttribute("scope")) p.push("th without scope: " + th.textContent);
				for (const i of document.querySelectorAll("input, button")) if (!i.labels?.length && !i.textContent.trim()) p.push("control without label: " + i.id);
				for (const t of document.querySelectorAll("table")) if (!t.querySelector("th")) p.push("table without header: " + t.id);
				if (document.querySelectorAll("h1:not([hidden] h1)").length !== 1) p.push("not one visible h1");
				for (const a of document.querySelectorAll("main a")) if (a.tabIndex < 0) p.push("link out of the tab order: " + a.textContent);
				return p;
			})()`, &problems)
			for _, p := range problems {
				t.Errorf("%s: %s", page, p)
			}
		}
		b.check(t, false)
	})

	t.Run("live regions announce changes, not every poll", func(t *testing.T) {
		b.open(t, e.url+"/ui/")
		b.wait(t, "the first poll", `document.getElementById("services-updated").textContent !== "" &&
			document.getElementById("agent-updated").textContent !== ""`)
		b.eval(t, `(() => {
			window.__announced = [];
			const o = new MutationObserver((ms) => { for (const m of ms) window.__announced.push(m.target.textContent || m.target.id); });
			for (const n of document.querySelectorAll('[role="status"]')) o.observe(n, {childList: true, characterData: true, subtree: true, attributes: true});
			window.__polls = 0;
			new MutationObserver(() => window.__polls++).observe(document.getElementById("agent-updated"), {childList: true});
		})()`, nil)
		b.wait(t, "two more polls of the agent", `window.__polls >= 2`)
		var announced []string
		b.eval(t, `window.__announced`, &announced)
		if len(announced) > 0 {
			t.Errorf("status regions changed with nothing new to say: %q", announced)
		}
		b.check(t, false)
	})

	t.Run("a phone's width needs no sideways scrolling", func(t *testing.T) {
		for _, page := range []string{"/ui/", "/ui/#/services/web"} {
			b.run(t, "phone viewport", chromedp.EmulateViewport(375, 740))
			b.open(t, e.url+page)
			b.wait(t, "the page to fill", `document.querySelectorAll("tr[data-service], tr[data-addr]").length >= 2`)
			var fits bool
			b.eval(t, `document.documentElement.scrollWidth <= window.innerWidth`, &fits)
			if !fits {
				t.Errorf("%s is wider than a phone (375 px)", page)
			}
		}
		b.run(t, "desktop viewport", chromedp.EmulateViewport(1280, 760))
		b.check(t, false)
	})

	t.Run("a failing health check shows on both pages without reload", func(t *testing.T) {
		// Two checked instances: one stays up, so that the service stays
		// listed on the first page; the other's target goes away.
		up, _ := testkit.TCPTarget(t)
		down, stop := testkit.TCPTarget(t)
		e.mustPutChecked(t, "checked", up, up)
		e.mustPutChecked(t, "checked", down, down)
		defer e.mustDelete(t, "checked", up)
		defer e.mustDelete(t, "checked", down)

		b.openService(t, e, "checked")
		row := rowText(`tr[data-addr="` + down + `"]`)
		b.wait(t, "the instance online with its check passing", `(() => {
			const r = document.querySelector('tr[data-addr="`+down+`"]');
			return r && !r.hasAttribute("data-offline") && /\d+\s+(≥ )?\d+ s/.test(r.innerText) &&
				`+row+`.includes("online passing") && `+row+`.includes("kind=checked");
		})()`)
		b.wait(t, "the Check column shown", `getComputedStyle(document.querySelector("#instances-table th.col-check")).display !== "none"`)
		b.eval(t, markPage, nil)
		stop()
		start := time.Now()
		b.wait(t, "the instance listed offline, failing, with its last error", `(() => {
			const r = document.querySelector('tr[data-addr="`+down+`"]');
			return r && r.hasAttribute("data-offline") && `+row+`.includes("offline") &&
				`+row+`.includes("failing") && `+row+`.includes("refused") && `+row+`.includes("kind=checked");
		})()`)
		t.Logf("the failure showed %v after the target closed", time.Since(start))
		b.wait(t, "the change log", `document.getElementById("log").innerText.includes(`+js(down+": check online → offline")+`)`)
		b.wait(t, "the other instance still online and leading", `(() => {
			const r = document.querySelector('tr[data-addr="`+up+`"]');
			return r && r.classList.contains("leader") && r.innerText.includes("online passing");
		})()`)
		b.wait(t, "no reload", unreloded)

		b.open(t, e.url+"/ui/")
		b.wait(t, "1 online of 2 on the first page", rowText(`tr[data-service="checked"]`)+`.match(/checked\s+1 \/ 2\s/)`)
		b.check(t, false)
	})

	t.Run("with a token required, the page asks for one and keeps it in a cookie", func(t *testing.T) {
		want := "s3cret"
		e.token.Store(&want)
		defer e.token.Store(nil)
		b.open(t, e.url+"/ui/")
		b.wait(t, "the 401 message", `!document.getElementById("auth").hidden &&
			document.getElementById("auth").innerText.includes("asks for an access token")`)
		b.run(t, "enter a wrong token", chromedp.SendKeys("#token", "wrong", chromedp.ByQuery),
			chromedp.Click(`#token-form button[type="submit"]`, chromedp.ByQuery))
		b.wait(t, "the 403 message", `document.getElementById("auth").innerText.includes("may not read")`)
		b.run(t, "enter the token", chromedp.SendKeys("#token", want, chromedp.ByQuery),
			chromedp.Click(`#token-form button[type="submit"]`, chromedp.ByQuery))
		b.wait(t, "the services, and no message", `document.getElementById("auth").hidden &&
			!!document.querySelector('tr[data-service="web"]') && document.getElementById("a-health").textContent === "ok"`)
		var cookies []*network.Cookie
		b.run(t, "read the cookies", chromedp.ActionFunc(func(ctx context.Context) error {
			var err error
			cookies, err = network.GetCookies().WithURLs([]string{e.url}).Do(ctx)
			return err
		}))
		found := false
		for _, c := range cookies {
			if c.Name == "discoverd_token" {
				found = true
				if c.Value != want || c.Path != "/" || c.SameSite != network.CookieSameSiteStrict {
					t.Errorf("cookie %+v, want %s on path / with SameSite=Strict", c, want)
				}
			}
		}
		if !found {
			t.Errorf("no discoverd_token cookie among %d", len(cookies))
		}
		// A service page's streams carry the cookie too.
		b.openService(t, e, "web")
		b.run(t, "forget the token", chromedp.Click("#token-clear", chromedp.ByQuery))
		b.wait(t, "the cookie gone", `!document.cookie.includes("discoverd_token")`)
		b.check(t, true) // the 401 and 403 answers are failed loads
	})

	t.Run("a store outage shows on the agent panel", func(t *testing.T) {
		b.open(t, e.url+"/ui/")
		b.wait(t, "the store healthy", `document.getElementById("a-health").textContent === "ok"`)
		b.eval(t, markPage, nil)
		e.cluster.Member(0).Stop()
		b.wait(t, "the outage", `document.getElementById("a-health").textContent.startsWith("unavailable") &&
			document.getElementById("agent-status").textContent.includes("Store outage")`)
		if err := e.cluster.Member(0).Restart(); err != nil {
			t.Fatal(err)
		}
		b.wait(t, "the store back", `document.getElementById("a-health").textContent === "ok" &&
			!document.getElementById("agent-status").textContent.includes("outage")`)
		b.wait(t, "no reload", unreloded)
		b.check(t, true) // GET /services fails while the store is down
	})

	if *screenshot != "" {
		t.Run("screenshot", func(t *testing.T) { takeScreenshot(t, b, e) })
	}
}

// takeScreenshot writes the first page, with a few services, to the
// -ui.screenshot file.
func takeScreenshot(t *testing.T, b *browser, e *env) {
	e.mustPut(t, "api", "10.0.2.1:9000", `"version":"1.4.2"`)
	e.mustPut(t, "api", "10.0.2.2:9000", `"version":"1.4.2"`)
	e.mustPut(t, "cache", "10.0.3.1:6379", "")
	b.open(t, e.url+"/ui/")
	b.wait(t, "every service", `document.querySelectorAll("#services-table tbody tr").length === 4 &&
		document.getElementById("a-health").textContent === "ok"`)
	e.mustPut(t, "web", "10.0.0.3:8080", `"version":"3"`)
	// A change seen live, and ages that have counted a little.
	b.wait(t, "the change and a few seconds", rowText(`tr[data-service="web"]`)+`.match(/3 \/ 3.*\t[3-9] s ago$/)`)
	var png []byte
	b.run(t, "screenshot", chromedp.CaptureScreenshot(&png))
	if err := os.WriteFile(*screenshot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s (%d bytes)", *screenshot, len(png))
}

// tbWriter sends log lines to t.Log.
type tbWriter struct{ t testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
