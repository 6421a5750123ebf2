// Package acl is the agent's access control: which service names a
// caller may register and which it may read, given the bearer token it
// presented (or none). It is pure rule matching and file parsing; the
// front ends (server/, the DNS server) ask it, and main loads and reloads
// the file.
//
//	a, err := acl.Load("/etc/discoverd/acl.json")
//	if err != nil { ... }
//	p := a.Principal(acl.NewCredential(bearerToken))
//	if !p.CanRegister("web") { ... permission_denied ... }
//
// The file holds no secret, only the SHA-256 of each token:
//
//	{"tokens": [{"name": "web-deployer", "sha256": "<64 hex digits>",
//	             "register": ["web", "web-*"], "read": ["*"]}],
//	 "anonymous": {"register": [], "read": ["*"]}}
//
// A pattern is an exact service name, or a prefix followed by "*" ("*"
// alone matches every name). A request without a token gets the anonymous
// rules; a token that matches no entry gets no rights at all (it is not
// treated as anonymous, so a mistyped token is noticed).
//
// A nil *ACL allows everything: it is the agent without -acl-file.
// ACL values are immutable and safe for concurrent use.
package acl

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/flynn/discoverd/api"
)

// MaxFileSize caps an ACL file, in bytes.
const MaxFileSize = 4 << 20

// File is the JSON form of an ACL file.
type File struct {
	Tokens    []Token `json:"tokens"`
	Anonymous Rules   `json:"anonymous"`
}

// Token is one token's entry: its name (logged, never the token), the
// lower- or upper-case hex SHA-256 of the token, and its rules.
type Token struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
	Rules
}

// Rules lists the patterns of the names a caller may register (which
// includes heartbeating and unregistering over HTTP) and read (lookups,
// streams, DNS).
type Rules struct {
	Register []string `json:"register"`
	Read     []string `json:"read"`
}

// ACL is a parsed ACL file. The zero value denies everything; nil allows
// everything.
type ACL struct {
	tokens    []entry
	anonymous rules
}

type entry struct {
	name  string
	sum   [sha256.Size]byte
	rules rules
}

// rules is Rules compiled: exact names in a set, prefixes in a list.
type rules struct {
	register, read matcher
}

type matcher struct {
	all      bool
	exact    map[string]struct{}
	prefixes []string
}

func (m *matcher) match(name string) bool {
	if m.all {
		return true
	}
	if _, ok := m.exact[name]; ok {
		return true
	}
	for _, p := range m.prefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// Load reads and parses the ACL file at path (see Parse).
func Load(path string) (*ACL, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("acl: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("acl: reading %s: %w", path, err)
	}
	a, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return a, nil
}

// Parse parses an ACL file. It is strict: unknown fields, trailing data,
// a token without a name or with a malformed or repeated hash, a repeated
// name, and a pattern that is neither a valid service name nor a prefix of
// one followed by "*" are errors that say where they are.
func Parse(data []byte) (*ACL, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("acl: file is larger than %d bytes", MaxFileSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f File
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("acl: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("acl: data after the JSON object")
	}
	return Compile(f)
}

// Compile checks f and compiles it into an ACL (see Parse for the checks).
func Compile(f File) (*ACL, error) {
	a := &ACL{}
	var err error
	if a.anonymous, err = compileRules(f.Anonymous); err != nil {
		return nil, fmt.Errorf("acl: anonymous: %w", err)
	}
	names := map[string]bool{}
	sums := map[[sha256.Size]byte]bool{}
	for i, t := range f.Tokens {
		if err := validateTokenName(t.Name); err != nil {
			return nil, fmt.Errorf("acl: tokens[%d]: %w", i, err)
		}
		if names[t.Name] {
			return nil, fmt.Errorf("acl: tokens[%d]: name %q is used twice", i, t.Name)
		}
		names[t.Name] = true
		e := entry{name: t.Name}
		raw, err := hex.DecodeString(t.SHA256)
		if err != nil || len(raw) != sha256.Size {
			return nil, fmt.Errorf("acl: token %q: sha256 must be %d hex digits (the SHA-256 of the token, as sha256sum prints it)", t.Name, 2*sha256.Size)
		}
		copy(e.sum[:], raw)
		if sums[e.sum] {
			return nil, fmt.Errorf("acl: token %q: the same sha256 is given for another token", t.Name)
		}
		sums[e.sum] = true
		if e.rules, err = compileRules(t.Rules); err != nil {
			return nil, fmt.Errorf("acl: token %q: %w", t.Name, err)
		}
		a.tokens = append(a.tokens, e)
	}
	return a, nil
}

// maxTokenName caps a token's name, which is logged.
const maxTokenName = 128

func validateTokenName(name string) error {
	if name == "" {
		return errors.New("name is empty")
	}
	if len(name) > maxTokenName {
		return fmt.Errorf("name is longer than %d bytes", maxTokenName)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x21 || c > 0x7e {
			return fmt.Errorf("name %q has a character that is not printable ASCII at byte %d", name, i)
		}
	}
	return nil
}

func compileRules(r Rules) (rules, error) {
	reg, err := compileMatcher(r.Register)
	if err != nil {
		return rules{}, fmt.Errorf("register: %w", err)
	}
	read, err := compileMatcher(r.Read)
	if err != nil {
		return rules{}, fmt.Errorf("read: %w", err)
	}
	return rules{register: reg, read: read}, nil
}

func compileMatcher(patterns []string) (matcher, error) {
	m := matcher{exact: map[string]struct{}{}}
	for _, p := range patterns {
		if err := ValidatePattern(p); err != nil {
			return matcher{}, err
		}
		switch prefix, wild := strings.CutSuffix(p, "*"); {
		case !wild:
			m.exact[p] = struct{}{}
		case prefix == "":
			m.all = true
		default:
			m.prefixes = append(m.prefixes, prefix)
		}
	}
	return m, nil
}

// ValidatePattern checks one pattern: a valid service name
// (api.ValidateName), "*", or a prefix of a valid name followed by "*".
func ValidatePattern(p string) error {
	prefix, wild := strings.CutSuffix(p, "*")
	if !wild {
		if err := api.ValidateName(p); err != nil {
			return fmt.Errorf("pattern %q is not a service name, nor a prefix ending in *", p)
		}
		return nil
	}
	if prefix == "" {
		return nil
	}
	// A prefix is valid when some valid name starts with it; every name
	// character may end a name, so the prefix itself must be a valid name.
	if err := api.ValidateName(prefix); err != nil || strings.Contains(prefix, "*") {
		return fmt.Errorf("pattern %q: %q before the * is not the start of a service name", p, prefix)
	}
	return nil
}

// Credential is what a request presented: a bearer token, kept only as
// its SHA-256, or nothing. The zero value is the anonymous credential.
type Credential struct {
	present bool
	sum     [sha256.Size]byte
}

// NewCredential hashes token; "" is the anonymous credential.
func NewCredential(token string) Credential {
	if token == "" {
		return Credential{}
	}
	return Credential{present: true, sum: sha256.Sum256([]byte(token))}
}

// Anonymous reports whether c carries no token.
func (c Credential) Anonymous() bool { return !c.present }

// Principal is who a credential is under one ACL: its rules and, for a
// token, the token's name.
type Principal struct {
	// Name is the token's name in the ACL file; "" for the anonymous
	// caller and for every caller of a nil ACL.
	Name string
	// Known is false for a token that matches no entry of the file (it
	// has no rights).
	Known bool
	rules *rules // nil: everything allowed
}

// Principal returns who c is under a. The token's hash is compared with
// every entry in constant time (crypto/subtle), so the time taken tells
// nothing of which entry, if any, matched.
func (a *ACL) Principal(c Credential) Principal {
	if a == nil {
		return Principal{Known: true}
	}
	if !c.present {
		return Principal{Known: true, rules: &a.anonymous}
	}
	found := -1
	for i := range a.tokens {
		if subtle.ConstantTimeCompare(a.tokens[i].sum[:], c.sum[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return Principal{rules: &rules{}}
	}
	e := &a.tokens[found]
	return Principal{Name: e.name, Known: true, rules: &e.rules}
}

// Anonymous returns the principal of requests without a token (DNS).
func (a *ACL) Anonymous() Principal { return a.Principal(Credential{}) }

// CanRegister reports whether p may register, heartbeat and unregister
// instances of the service name.
func (p Principal) CanRegister(name string) bool {
	return p.rules == nil || p.rules.register.match(name)
}

// CanRead reports whether p may look up and watch the service name.
func (p Principal) CanRead(name string) bool {
	return p.rules == nil || p.rules.read.match(name)
}

// Describe names p for logs and error messages: the token's name,
// "anonymous", or "unknown token"; never the token.
func (p Principal) Describe(c Credential) string {
	switch {
	case !c.present:
		return "anonymous"
	case !p.Known:
		return "unknown token"
	case p.Name == "":
		return "token"
	}
	return "token " + p.Name
}

// Tokens is the number of token entries of a (0 for nil).
func (a *ACL) Tokens() int {
	if a == nil {
		return 0
	}
	return len(a.tokens)
}
