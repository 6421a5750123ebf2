package acl_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flynn/discoverd/acl"
)

func sum(token string) string {
	s := sha256.Sum256([]byte(token))
	return hex.EncodeToString(s[:])
}

func mustParse(tb testing.TB, data string) *acl.ACL {
	tb.Helper()
	a, err := acl.Parse([]byte(data))
	if err != nil {
		tb.Fatalf("Parse: %v", err)
	}
	return a
}

func TestPrincipalRules(t *testing.T) {
	a := mustParse(t, `{"tokens": [
		{"name": "web-deployer", "sha256": "`+sum("s3cret")+`", "register": ["web", "web-*"], "read": ["*"]},
		{"name": "db", "sha256": "`+strings.ToUpper(sum("db-token"))+`", "register": ["db"], "read": ["db", "web"]}
	], "anonymous": {"register": [], "read": ["pub-*"]}}`)
	tests := []struct {
		token, name    string
		known          bool
		who            string
		register, read bool
	}{
		{"s3cret", "web", true, "token web-deployer", true, true},
		{"s3cret", "web-api", true, "token web-deployer", true, true},
		{"s3cret", "webx", true, "token web-deployer", false, true},
		{"s3cret", "db", true, "token web-deployer", false, true},
		{"db-token", "db", true, "token db", true, true},
		{"db-token", "db2", true, "token db", false, false},
		{"db-token", "web", true, "token db", false, true},
		{"", "pub-x", true, "anonymous", false, true},
		{"", "web", true, "anonymous", false, false},
		{"wrong", "pub-x", false, "unknown token", false, false},
	}
	for _, tt := range tests {
		c := acl.NewCredential(tt.token)
		p := a.Principal(c)
		if p.Known != tt.known || p.Describe(c) != tt.who {
			t.Errorf("token %q: known %v, %q; want %v, %q", tt.token, p.Known, p.Describe(c), tt.known, tt.who)
		}
		if got := p.CanRegister(tt.name); got != tt.register {
			t.Errorf("token %q CanRegister(%q) = %v, want %v", tt.token, tt.name, got, tt.register)
		}
		if got := p.CanRead(tt.name); got != tt.read {
			t.Errorf("token %q CanRead(%q) = %v, want %v", tt.token, tt.name, got, tt.read)
		}
	}
}

func TestNilACLAllowsEverything(t *testing.T) {
	var a *acl.ACL
	p := a.Principal(acl.NewCredential("anything"))
	if !p.CanRegister("x") || !p.CanRead("x") || !a.Anonymous().CanRegister("y") {
		t.Fatal("nil ACL denied something")
	}
}

func TestZeroRulesDenyEverything(t *testing.T) {
	a := mustParse(t, `{}`)
	p := a.Anonymous()
	if p.CanRegister("web") || p.CanRead("web") {
		t.Fatal("empty anonymous rules allowed something")
	}
}

func TestParseErrors(t *testing.T) {
	good := sum("t")
	tests := []struct{ name, data, want string }{
		{"not json", `{`, "unexpected EOF"},
		{"unknown field", `{"tokens": [], "anon": {}}`, "unknown field"},
		{"trailing data", `{} {}`, "data after"},
		{"no name", `{"tokens": [{"sha256": "` + good + `"}]}`, "name is empty"},
		{"name with space", `{"tokens": [{"name": "a b", "sha256": "` + good + `"}]}`, "printable"},
		{"short hash", `{"tokens": [{"name": "a", "sha256": "abcd"}]}`, "64 hex digits"},
		{"non-hex hash", `{"tokens": [{"name": "a", "sha256": "` + strings.Repeat("z", 64) + `"}]}`, "64 hex digits"},
		{"duplicate name", `{"tokens": [{"name": "a", "sha256": "` + good + `"}, {"name": "a", "sha256": "` + sum("u") + `"}]}`, "used twice"},
		{"duplicate hash", `{"tokens": [{"name": "a", "sha256": "` + good + `"}, {"name": "b", "sha256": "` + good + `"}]}`, "another token"},
		{"star inside", `{"anonymous": {"read": ["we*b"]}}`, "not a service name"},
		{"two stars", `{"anonymous": {"read": ["web**"]}}`, "before the *"},
		{"bad prefix", `{"anonymous": {"register": ["-x*"]}}`, "before the *"},
		{"empty pattern", `{"anonymous": {"read": [""]}}`, "not a service name"},
		{"bad token pattern", `{"tokens": [{"name": "a", "sha256": "` + good + `", "register": ["a/b"]}]}`, `token "a": register`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := acl.Parse([]byte(tt.data))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Parse(%s) = %v, want an error containing %q", tt.data, err, tt.want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "acl.json")
	if _, err := acl.Load(path); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
	if err := os.WriteFile(path, []byte(`{"anonymous": {"read": ["*"]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := acl.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !a.Anonymous().CanRead("anything") || a.Anonymous().CanRegister("anything") {
		t.Fatal("loaded rules not applied")
	}
	if err := os.WriteFile(path, []byte(`{"anonymous": {"read": ["-"]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := acl.Load(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("Load of a bad file: %v, want an error naming the file", err)
	}
}

// BenchmarkPrincipal is the cost of one check against a file of 100
// tokens (the token matched is the last; every entry is compared).
func BenchmarkPrincipal(b *testing.B) {
	f := acl.File{}
	for i := range 100 {
		f.Tokens = append(f.Tokens, acl.Token{Name: fmt.Sprint("t", i), SHA256: sum(fmt.Sprint("token-", i)),
			Rules: acl.Rules{Register: []string{"web", "web-*"}, Read: []string{"*"}}})
	}
	a, err := acl.Compile(f)
	if err != nil {
		b.Fatal(err)
	}
	c := acl.NewCredential("token-99")
	for b.Loop() {
		if !a.Principal(c).CanRegister("web-api") {
			b.Fatal("denied")
		}
	}
}
