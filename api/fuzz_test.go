package api_test

import (
	"encoding/json"
	"net"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/flynn/discoverd/api"
)

// FuzzValidateArgs checks that validation never panics, that whatever it
// accepts obeys the documented limits, and that accepted attributes survive
// a JSON round trip unchanged (the backends store them as JSON).
func FuzzValidateArgs(f *testing.F) {
	f.Add("web", "10.0.0.1:80", "k", "v")
	f.Add("a.b-c_d", "[::1]:65535", "", "")
	f.Add("-x", ":0", "\xff", "\x00")
	f.Add(strings.Repeat("n", 129), "host:99999", strings.Repeat("k", 129), "v")
	f.Fuzz(func(t *testing.T, name, addr, key, value string) {
		args := api.Args{Name: name, Addr: addr, Attrs: map[string]string{key: value}}
		err := args.Validate()
		if err == nil {
			if len(name) == 0 || len(name) > api.MaxNameLen || len(addr) > api.MaxAddrLen {
				t.Fatalf("accepted out-of-bounds args %q %q", name, addr)
			}
			if _, _, err := net.SplitHostPort(addr); err != nil {
				t.Fatalf("accepted addr %q that is not host:port: %v", addr, err)
			}
			if strings.Contains(name, "/") || strings.Contains(addr, "/") {
				t.Fatalf("accepted a '/' that would break store keys: %q %q", name, addr)
			}
			b, err := json.Marshal(args.Attrs)
			if err != nil {
				t.Fatal(err)
			}
			var back map[string]string
			if err := json.Unmarshal(b, &back); err != nil || back[key] != value {
				t.Fatalf("attrs do not survive JSON: %q=%q -> %v", key, value, back)
			}
		} else if api.ErrorCode(err) != api.CodeInvalidArgument {
			t.Fatalf("error %v has code %q", err, api.ErrorCode(err))
		}
		if err != nil && !utf8.ValidString(err.Error()) {
			t.Fatalf("error text is not valid UTF-8: %q", err.Error())
		}
	})
}

// FuzzExpandAddr checks that expansion never panics and that an expanded
// address either validates or is rejected with invalid_argument.
func FuzzExpandAddr(f *testing.F) {
	f.Add(":80", "10.0.0.1")
	f.Add(":80", "")
	f.Add("1.2.3.4:5", "::1")
	f.Add(":", "x")
	f.Fuzz(func(t *testing.T, addr, ip string) {
		got, err := api.ExpandAddr(addr, ip)
		if err != nil {
			if api.ErrorCode(err) != api.CodeInvalidArgument {
				t.Fatalf("code %q", api.ErrorCode(err))
			}
			return
		}
		if !strings.HasPrefix(addr, ":") && got != addr {
			t.Fatalf("ExpandAddr changed %q to %q", addr, got)
		}
		if err := api.ValidateAddr(got); err != nil && api.ErrorCode(err) != api.CodeInvalidArgument {
			t.Fatalf("code %q", api.ErrorCode(err))
		}
	})
}

// FuzzParseError checks that any text received over the wire becomes a
// typed error whose text is the input again.
func FuzzParseError(f *testing.F) {
	f.Add("not_found: unknown registration")
	f.Add("EOS")
	f.Add("internal: ")
	f.Fuzz(func(t *testing.T, text string) {
		err := api.ParseError(text)
		if text == "" {
			if err != nil {
				t.Fatal("non-nil error for empty text")
			}
			return
		}
		if api.ErrorCode(err) == api.CodeInternal && !strings.HasPrefix(text, "internal: ") {
			if err.(*api.Error).Message != text {
				t.Fatalf("message %q, want %q", err.(*api.Error).Message, text)
			}
			return
		}
		if err.Error() != text {
			t.Fatalf("ParseError(%q).Error() = %q", text, err.Error())
		}
	})
}
