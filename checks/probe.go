package checks

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/flynn/discoverd/api"
)

// maxProbeBody is how much of an HTTP check's response body is read (and
// discarded) before the connection is closed.
const maxProbeBody = 4 << 10

// probe runs one probe of spec, bounded by its timeout (real time), and
// returns nil when it passes.
func (m *Manager) probe(ctx context.Context, spec *api.Check) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(spec.Timeout))
	defer cancel()
	switch {
	case spec.HTTP != "":
		return m.probeHTTP(ctx, spec.HTTP)
	case spec.GRPC != "":
		return probeGRPC(ctx, spec.GRPC)
	}
	conn, err := m.dialer.DialContext(ctx, "tcp", spec.TCP)
	if err != nil {
		return fmt.Errorf("tcp: %w", err)
	}
	return conn.Close()
}

// probeHTTP GETs url: a 2xx or 3xx status passes (redirects are not
// followed).
func (m *Manager) probeHTTP(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("http: %w", err)
	}
	req.Header.Set("User-Agent", "discoverd-check")
	resp, err := m.http.Do(req)
	if err != nil {
		return fmt.Errorf("http: %w", err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxProbeBody))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("http: status %s", resp.Status)
	}
	return nil
}
