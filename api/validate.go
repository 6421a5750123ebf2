package api

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ValidateName checks a service name: 1 to MaxNameLen bytes of
// [A-Za-z0-9._-], starting with a letter or a digit.
func ValidateName(name string) error {
	if name == "" {
		return Errorf(CodeInvalidArgument, "service name is empty")
	}
	if len(name) > MaxNameLen {
		return Errorf(CodeInvalidArgument, "service name is %d bytes, more than the limit of %d", len(name), MaxNameLen)
	}
	if !isAlnum(name[0]) {
		return Errorf(CodeInvalidArgument, "service name %q must start with a letter or a digit", name)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; !isAlnum(c) && c != '.' && c != '_' && c != '-' {
			return Errorf(CodeInvalidArgument, "service name %q has a character outside [A-Za-z0-9._-] at byte %d", name, i)
		}
	}
	return nil
}

// ValidateAddr checks an instance address: "host:port" where host is an IP
// address or a DNS name and port is a number from 1 to 65535. An address
// without a host (":port") is not valid here; expand it first with
// ExpandAddr.
func ValidateAddr(addr string) error {
	if addr == "" {
		return Errorf(CodeInvalidArgument, "address is empty")
	}
	if len(addr) > MaxAddrLen {
		return Errorf(CodeInvalidArgument, "address is %d bytes, more than the limit of %d", len(addr), MaxAddrLen)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return Errorf(CodeInvalidArgument, "address %q is not host:port", addr)
	}
	if err := validatePort(addr, port); err != nil {
		return err
	}
	if host == "" {
		return Errorf(CodeInvalidArgument, "address %q has no host", addr)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return Errorf(CodeInvalidArgument, "address %q has an IPv6 zone, which is not supported", addr)
		}
		if ip.Is6() && !strings.HasPrefix(addr, "[") {
			return Errorf(CodeInvalidArgument, "address %q: an IPv6 host must be in brackets", addr)
		}
		return nil
	}
	if !isHostname(host) {
		return Errorf(CodeInvalidArgument, "address %q: host is neither an IP address nor a DNS name", addr)
	}
	return nil
}

func validatePort(addr, port string) error {
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || port[0] == '0' || port[0] == '+' {
		return Errorf(CodeInvalidArgument, "address %q: port must be a number from 1 to 65535", addr)
	}
	return nil
}

// isHostname accepts dot-separated labels of [A-Za-z0-9_-], each 1 to 63
// bytes, not starting or ending with '-', 255 bytes at most in all.
func isHostname(h string) bool {
	if len(h) > 255 {
		return false
	}
	for label := range strings.SplitSeq(strings.TrimSuffix(h, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !isAlnum(c) && c != '-' && c != '_' {
				return false
			}
		}
	}
	return true
}

// ValidateAttrs checks a registration's attributes: at most MaxAttrs, keys
// of 1 to MaxAttrKeyLen bytes and values of at most MaxAttrValueLen bytes,
// all valid UTF-8, keys without control characters.
func ValidateAttrs(attrs map[string]string) error {
	if len(attrs) > MaxAttrs {
		return Errorf(CodeInvalidArgument, "%d attributes, more than the limit of %d", len(attrs), MaxAttrs)
	}
	for k, v := range attrs {
		switch {
		case k == "":
			return Errorf(CodeInvalidArgument, "attribute key is empty")
		case len(k) > MaxAttrKeyLen:
			return Errorf(CodeInvalidArgument, "attribute key %.32q... is %d bytes, more than the limit of %d", k, len(k), MaxAttrKeyLen)
		case !utf8.ValidString(k) || strings.IndexFunc(k, unicode.IsControl) >= 0:
			return Errorf(CodeInvalidArgument, "attribute key %q is not printable UTF-8", k)
		case len(v) > MaxAttrValueLen:
			return Errorf(CodeInvalidArgument, "attribute %q: value is %d bytes, more than the limit of %d", k, len(v), MaxAttrValueLen)
		case !utf8.ValidString(v):
			return Errorf(CodeInvalidArgument, "attribute %q: value is not valid UTF-8", k)
		}
	}
	return nil
}

// ExpandAddr turns an address written as ":port" into "externalIP:port".
// Other addresses are returned unchanged. It fails with CodeInvalidArgument
// when addr has no host and externalIP is empty (EXTERNAL_IP is unset).
// It does not validate; call ValidateAddr on the result.
func ExpandAddr(addr, externalIP string) (string, error) {
	if !strings.HasPrefix(addr, ":") {
		return addr, nil
	}
	if externalIP == "" {
		return "", Errorf(CodeInvalidArgument, "address %q has no host and EXTERNAL_IP is not set on the agent", addr)
	}
	return net.JoinHostPort(externalIP, addr[1:]), nil
}

// Validate checks the fields of a Register call: name, addr (already
// expanded) and attrs.
func (a *Args) Validate() error {
	if err := ValidateName(a.Name); err != nil {
		return err
	}
	if err := ValidateAddr(a.Addr); err != nil {
		return err
	}
	return ValidateAttrs(a.Attrs)
}

// Validation at the edge. What a caller sends is checked once, where it
// enters: the RPC receiver and the HTTP handlers of the agent (and the
// DNS server for the names it is asked). The agent and the backends trust
// what they are given, so these are the only places a caller's mistake is
// reported; each reports a CodeInvalidArgument *Error.

// ValidateRegister checks the arguments of a Register as they arrive: the
// name, the attributes and the address, either complete or ":port" (the
// agent expands that form; see ExpandAddr).
func (a *Args) ValidateRegister() error {
	if err := a.ValidateKey(); err != nil {
		return err
	}
	return ValidateAttrs(a.Attrs)
}

// ValidateKey checks the name and address of a Register, Heartbeat or
// Unregister as they arrive, the address complete or ":port".
func (a *Args) ValidateKey() error {
	if err := ValidateName(a.Name); err != nil {
		return err
	}
	if port, ok := strings.CutPrefix(a.Addr, ":"); ok {
		return validatePort(a.Addr, port)
	}
	return ValidateAddr(a.Addr)
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}
