package checks

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/flynn/discoverd/api"
)

// journal keeps the checked registrations in a file: one JSON record a
// line, "put" (the whole registration) or "del". It is replayed and
// compacted (rewritten with one put per live registration) when opened,
// and compacted again when the dead records outnumber the live ones.
// Each record is synced before the call returns.
type journal struct {
	path string

	mu      sync.Mutex
	f       *os.File
	live    map[key]api.Args
	records int // lines in the file
}

// record is one line of the journal.
type record struct {
	Op    string            `json:"op"` // "put" or "del"
	Name  string            `json:"name"`
	Addr  string            `json:"addr"`
	Attrs map[string]string `json:"attrs,omitempty"`
	Check *api.Check        `json:"check,omitempty"`
}

// maxRecord bounds one line of the journal: a registration at its limits
// with JSON quoting fits well within it.
const maxRecord = 1 << 20

// openJournal reads the journal at path (a missing file is an empty
// one), compacts it, and returns it with the registrations it holds, in
// the order they were first saved. A line that cannot be read (a write
// torn by a crash) is skipped with a warning.
func openJournal(path string, log *slog.Logger) (*journal, []api.Args, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, nil, fmt.Errorf("checks: journal directory: %w", err)
	}
	j := &journal{path: path, live: make(map[key]api.Args)}
	var order []key
	f, err := os.Open(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, nil, fmt.Errorf("checks: open journal: %w", err)
	default:
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), maxRecord)
		line := 0
		for sc.Scan() {
			line++
			var r record
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.Name == "" || (r.Op != "put" && r.Op != "del") {
				log.Warn("checks: skipping an unreadable journal record", "file", path, "line", line)
				continue
			}
			k := key{r.Name, r.Addr}
			if r.Op == "del" {
				delete(j.live, k)
				continue
			}
			if _, ok := j.live[k]; !ok {
				order = append(order, k)
			}
			j.live[k] = api.Args{Name: r.Name, Addr: r.Addr, Attrs: r.Attrs, Check: r.Check}
		}
		err := sc.Err()
		f.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("checks: read journal %s: %w", path, err)
		}
	}
	order = slices.DeleteFunc(order, func(k key) bool { _, ok := j.live[k]; return !ok })
	if err := j.compact(order); err != nil {
		return nil, nil, err
	}
	saved := make([]api.Args, 0, len(order))
	for _, k := range order {
		saved = append(saved, j.live[k])
	}
	return j, saved, nil
}

// compact rewrites the file with one put per live registration (in
// order, then any others), atomically, and reopens it for appending.
func (j *journal) compact(order []key) error {
	tmp := j.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("checks: compact journal: %w", err)
	}
	w := bufio.NewWriter(f)
	enc := json.NewEncoder(w)
	seen := make(map[key]bool, len(j.live))
	put := func(k key) error {
		a := j.live[k]
		seen[k] = true
		return enc.Encode(record{Op: "put", Name: a.Name, Addr: a.Addr, Attrs: a.Attrs, Check: a.Check})
	}
	for _, k := range order {
		if err = put(k); err != nil {
			break
		}
	}
	for k := range j.live {
		if err == nil && !seen[k] {
			err = put(k)
		}
	}
	if err == nil {
		err = w.Flush()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, j.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("checks: compact journal: %w", err)
	}
	if j.f != nil {
		j.f.Close()
	}
	j.f, err = os.OpenFile(j.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("checks: reopen journal: %w", err)
	}
	j.records = len(j.live)
	return nil
}

func (j *journal) put(a api.Args) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.append(record{Op: "put", Name: a.Name, Addr: a.Addr, Attrs: a.Attrs, Check: a.Check}); err != nil {
		return err
	}
	j.live[key{a.Name, a.Addr}] = a
	return j.maybeCompact()
}

func (j *journal) del(name, addr string) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.append(record{Op: "del", Name: name, Addr: addr}); err != nil {
		return err
	}
	delete(j.live, key{name, addr})
	return j.maybeCompact()
}

// append writes and syncs one record.
func (j *journal) append(r record) error {
	if j.f == nil {
		return errors.New("checks: journal closed")
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if _, err := j.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("checks: write journal: %w", err)
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("checks: sync journal: %w", err)
	}
	j.records++
	return nil
}

// maybeCompact compacts once dead records outnumber live ones (and there
// are more than a few).
func (j *journal) maybeCompact() error {
	if j.records < 64 || j.records < 2*len(j.live) {
		return nil
	}
	return j.compact(nil)
}

func (j *journal) close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}
