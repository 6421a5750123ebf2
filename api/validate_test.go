package api_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/flynn/discoverd/api"
)

func TestValidateName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"web", true},
		{"a", true},
		{"0abc", true},
		{"my-service.v2_prod", true},
		{strings.Repeat("a", api.MaxNameLen), true},
		{"", false},
		{strings.Repeat("a", api.MaxNameLen+1), false},
		{"-web", false},
		{".web", false},
		{"_web", false},
		{"web/1", false},
		{"web 1", false},
		{"wéb", false},
		{"web\x00", false},
		{"web\n", false},
		{"\xff\xfe", false},
	} {
		t.Run(fmt.Sprintf("%.20q", tc.name), func(t *testing.T) {
			err := api.ValidateName(tc.name)
			checkValid(t, err, tc.ok)
		})
	}
}

func TestValidateAddr(t *testing.T) {
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"10.0.0.1:80", true},
		{"127.0.0.1:65535", true},
		{"[::1]:8080", true},
		{"[2001:db8::1]:1", true},
		{"db-1.example.com:5432", true},
		{"localhost:1", true},
		{"host_name:1", true},
		{"example.com.:443", true},
		{"", false},
		{":80", false},
		{"10.0.0.1", false},
		{"10.0.0.1:0", false},
		{"10.0.0.1:65536", false},
		{"10.0.0.1:-1", false},
		{"10.0.0.1:+80", false},
		{"10.0.0.1:080", false},
		{"10.0.0.1:http", false},
		{"::1:80", false},
		{"[fe80::1%eth0]:80", false},
		{"a/b:80", false},
		{"-bad.example:80", false},
		{"bad..example:80", false},
		{"h\x00st:80", false},
		{strings.Repeat("a", 64) + ".com:80", false},
		{strings.Repeat("a.", 130) + "com:80", false},
	} {
		t.Run(fmt.Sprintf("%.30q", tc.addr), func(t *testing.T) {
			checkValid(t, api.ValidateAddr(tc.addr), tc.ok)
		})
	}
}

func TestValidateAttrs(t *testing.T) {
	many := make(map[string]string)
	for i := 0; i <= api.MaxAttrs; i++ {
		many[fmt.Sprint("k", i)] = "v"
	}
	exactly := make(map[string]string)
	for i := 0; i < api.MaxAttrs; i++ {
		exactly[fmt.Sprint("k", i)] = strings.Repeat("v", api.MaxAttrValueLen)
	}
	for _, tc := range []struct {
		name  string
		attrs map[string]string
		ok    bool
	}{
		{"nil", nil, true},
		{"empty value", map[string]string{"k": ""}, true},
		{"unicode", map[string]string{"zone": "zürich"}, true},
		{"at every limit", exactly, true},
		{"too many", many, false},
		{"empty key", map[string]string{"": "v"}, false},
		{"long key", map[string]string{strings.Repeat("k", api.MaxAttrKeyLen+1): "v"}, false},
		{"long value", map[string]string{"k": strings.Repeat("v", api.MaxAttrValueLen+1)}, false},
		{"control in key", map[string]string{"a\nb": "v"}, false},
		{"invalid utf8 key", map[string]string{"\xff": "v"}, false},
		{"invalid utf8 value", map[string]string{"k": "\xff"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkValid(t, api.ValidateAttrs(tc.attrs), tc.ok)
		})
	}
}

func TestExpandAddr(t *testing.T) {
	for _, tc := range []struct {
		addr, ip, want string
		ok             bool
	}{
		{":80", "10.0.0.1", "10.0.0.1:80", true},
		{":80", "2001:db8::1", "[2001:db8::1]:80", true},
		{"1.2.3.4:80", "", "1.2.3.4:80", true},
		{"1.2.3.4:80", "10.0.0.1", "1.2.3.4:80", true},
		{":80", "", "", false},
	} {
		got, err := api.ExpandAddr(tc.addr, tc.ip)
		checkValid(t, err, tc.ok)
		if got != tc.want {
			t.Errorf("ExpandAddr(%q, %q) = %q, want %q", tc.addr, tc.ip, got, tc.want)
		}
	}
}

func TestArgsValidate(t *testing.T) {
	good := api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"v": "1"}}
	if err := good.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v, want nil", good, err)
	}
	for _, bad := range []api.Args{
		{Name: "", Addr: "10.0.0.1:80"},
		{Name: "web", Addr: "10.0.0.1"},
		{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"": ""}},
	} {
		checkValid(t, bad.Validate(), false)
	}
}

func TestErrorRoundTrip(t *testing.T) {
	orig := api.Errorf(api.CodeNotFound, "unknown registration %s", "web/10.0.0.1:80")
	got := api.ParseError(orig.Error())
	var e *api.Error
	if !errors.As(got, &e) || *e != *orig {
		t.Fatalf("ParseError(%q) = %#v, want %#v", orig.Error(), got, orig)
	}
	if !errors.Is(got, &api.Error{Code: api.CodeNotFound}) {
		t.Errorf("errors.Is(%v, not_found) = false", got)
	}
	if errors.Is(got, &api.Error{Code: api.CodeInternal}) {
		t.Errorf("errors.Is(%v, internal) = true", got)
	}
	if c := api.ErrorCode(api.ParseError("connection reset")); c != api.CodeInternal {
		t.Errorf("ErrorCode(untyped) = %q, want internal", c)
	}
	if api.ParseError("") != nil {
		t.Errorf("ParseError(\"\") != nil")
	}
	if c := api.ErrorCode(fmt.Errorf("op: %w", orig)); c != api.CodeNotFound {
		t.Errorf("ErrorCode(wrapped) = %q, want not_found", c)
	}
}

func checkValid(t *testing.T, err error, ok bool) {
	t.Helper()
	if ok && err != nil {
		t.Errorf("unexpected error: %v", err)
	}
	if !ok {
		if err == nil {
			t.Errorf("no error, want invalid_argument")
		} else if c := api.ErrorCode(err); c != api.CodeInvalidArgument {
			t.Errorf("code %q (%v), want invalid_argument", c, err)
		}
	}
}

func TestValidateAtTheEdge(t *testing.T) {
	tooMany := make(map[string]string)
	for i := range api.MaxAttrs + 1 {
		tooMany[fmt.Sprint(i)] = ""
	}
	for _, tc := range []struct {
		name     string
		args     api.Args
		key, reg bool
	}{
		{"complete address", api.Args{Name: "web", Addr: "10.0.0.1:80"}, true, true},
		{"port only", api.Args{Name: "web", Addr: ":80"}, true, true},
		{"port only, out of range", api.Args{Name: "web", Addr: ":0"}, false, false},
		{"port only, not a number", api.Args{Name: "web", Addr: ":http"}, false, false},
		{"no port", api.Args{Name: "web", Addr: "10.0.0.1"}, false, false},
		{"bad name", api.Args{Name: "-web", Addr: ":80"}, false, false},
		{"too many attributes", api.Args{Name: "web", Addr: ":80", Attrs: tooMany}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkValid(t, tc.args.ValidateKey(), tc.key)
			checkValid(t, tc.args.ValidateRegister(), tc.reg)
		})
	}
}
