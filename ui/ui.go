// Package ui is the agent's web console: a page, a style sheet and a
// script, embedded in the binary, that read the agent's own HTTP API from
// the browser (GET /services, GET /agent, and the SSE streams of
// /services/{name} and /services/{name}/leader). It has no build step and
// loads nothing from elsewhere, so it works on a host with no internet
// access. It only reads: every request it makes is a GET.
//
//	mux.Handle("GET /ui/", ui.Handler())
//
// With an ACL file, the page sends the token the operator typed as a
// cookie named discoverd_token (EventSource cannot set headers) and as an
// Authorization: Bearer header on its other requests.
//
// The tests drive the page in a headless Chromium (they skip when none
// is installed, unless CI=true). docs/console.png is their first page:
//
//	go test ./ui -run TestConsole/screenshot -args -ui.screenshot=$PWD/docs/console.png
package ui

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// Prefix is the path the console is served under; Handler expects the
// requests under it, prefix included.
const Prefix = "/ui/"

// Files returns the console's files (index.html, console.css, console.js).
func Files() fs.FS {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the directory is embedded: cannot happen
	}
	return sub
}

// Handler serves the console's files for requests under Prefix, with a
// Content-Security-Policy that lets the page load and connect to its own
// origin only. It is safe for concurrent use.
func Handler() http.Handler {
	files := http.StripPrefix(Prefix, http.FileServerFS(Files()))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "+
			"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache") // an upgraded agent serves its own files at once
		files.ServeHTTP(w, r)
	})
}
