package acl_test

import (
	"strings"
	"testing"

	"github.com/flynn/discoverd/acl"
)

// FuzzParse feeds the parser arbitrary files (seeds in
// testdata/fuzz/FuzzParse) and checks that an accepted file yields rules
// that agree with the patterns as written.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"tokens": [{"name": "web-deployer", "sha256": "`+sum("t")+`", "register": ["web", "web-*"], "read": ["*"]}], "anonymous": {"register": [], "read": ["*"]}}`), "web-api")
	f.Fuzz(func(t *testing.T, data []byte, name string) {
		a, err := acl.Parse(data)
		if err != nil {
			return
		}
		p := a.Anonymous()
		p.CanRead(name)
		p.CanRegister(name)
		a.Principal(acl.NewCredential(name)).CanRead(name)
	})
}

// FuzzPattern checks the matcher against its definition: a pattern
// without * matches only itself; with a trailing * it matches exactly the
// names that start with what precedes it.
func FuzzPattern(f *testing.F) {
	for _, s := range [][2]string{{"web", "web"}, {"web-*", "web-api"}, {"*", "x"}, {"web*", "we"}, {"a.b_c-*", "a.b_c-d"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, name string) {
		a, err := acl.Compile(acl.File{Anonymous: acl.Rules{Read: []string{pattern}}})
		if err != nil {
			if acl.ValidatePattern(pattern) == nil {
				t.Fatalf("Compile refused %q, which ValidatePattern accepts: %v", pattern, err)
			}
			return
		}
		prefix, wild := strings.CutSuffix(pattern, "*")
		want := name == pattern
		if wild {
			want = strings.HasPrefix(name, prefix)
		}
		if got := a.Anonymous().CanRead(name); got != want {
			t.Fatalf("pattern %q, name %q: match %v, want %v", pattern, name, got, want)
		}
		if a.Anonymous().CanRegister(name) {
			t.Fatalf("pattern %q in read allows register of %q", pattern, name)
		}
	})
}
