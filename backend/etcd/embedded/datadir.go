package embedded

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ErrDataDirLocked is wrapped by the error Start returns when
// another etcd (another agent, or this process) uses the data directory.
var ErrDataDirLocked = errors.New("data dir is in use by another etcd")

// checkDataDir makes sure dir can hold an etcd member before etcd is
// started on it: etcd waits without end for the lock of a database that
// another process holds, and only says so at info level after 10 s. It
// creates dir (mode 0700) if missing, checks that it is a writable
// directory, and that no process holds the lock of the member's database;
// the error names the holder when /proc/locks tells who it is.
func checkDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("data dir %s is not a directory", dir)
	}
	probe, err := os.CreateTemp(dir, ".discoverd-probe-*")
	if err != nil {
		return fmt.Errorf("data dir %s is not writable: %w", dir, err)
	}
	probe.Close()
	os.Remove(probe.Name())

	db := filepath.Join(dir, "member", "snap", "db")
	f, err := os.Open(db)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a new member
	}
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	defer f.Close()
	// bbolt takes an exclusive flock on the database for the life of the
	// etcd that opened it. Try it, and give it back at once.
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if err == nil {
		return syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	}
	if !errors.Is(err, syscall.EWOULDBLOCK) {
		return fmt.Errorf("data dir: locking %s: %w", db, err)
	}
	holder := "another process"
	if pid := lockHolder(f); pid > 0 {
		holder = fmt.Sprintf("process %d", pid)
		if pid == os.Getpid() {
			holder = fmt.Sprintf("this process (%d)", pid)
		} else if cmd := commandLine(pid); cmd != "" {
			holder = fmt.Sprintf("process %d (%s)", pid, cmd)
		}
	}
	return fmt.Errorf("%w: %s holds the lock of %s; stop it, or give this agent another -data-dir", ErrDataDirLocked, holder, db)
}

// lockHolder returns the pid that /proc/locks gives for a flock on f's
// file, or 0 when it does not tell.
func lockHolder(f *os.File) int {
	fi, err := f.Stat()
	if err != nil {
		return 0
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0
	}
	locks, err := os.Open("/proc/locks")
	if err != nil {
		return 0
	}
	defer locks.Close()
	// "1: FLOCK  ADVISORY  WRITE 31933 fe:00:9977885 0 EOF": the pid, then
	// major:minor:inode of the file.
	inode := ":" + strconv.FormatUint(st.Ino, 10)
	sc := bufio.NewScanner(locks)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || !strings.HasSuffix(f[5], inode) {
			continue
		}
		if pid, err := strconv.Atoi(f[4]); err == nil && pid > 0 {
			return pid
		}
	}
	return 0
}

// commandLine returns the command line of pid, shortened, or "".
func commandLine(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	if len(s) > 120 {
		s = s[:120] + "..."
	}
	return s
}
