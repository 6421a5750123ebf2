package main

import (
	"flag"
	"fmt"
	"path/filepath"

	"github.com/flynn/discoverd/checks"
)

// checksFile is the journal of the checked registrations, in the data dir.
const checksFile = "checks.journal"

// checksMain is the health-check runner of Main (docs/API.md, "Health
// checks"): its settings ("-max-check-probes", "-max-checks") and its
// running pieces. Main embeds it.
type checksMain struct {
	// MaxCheckProbes caps the health-check probes in flight
	// ("-max-check-probes").
	MaxCheckProbes int
	// MaxChecks caps the checked registrations of the agent
	// ("-max-checks").
	MaxChecks int

	checks *checks.Manager
}

func defaultChecks() checksMain {
	return checksMain{MaxCheckProbes: checks.DefaultMaxInFlight, MaxChecks: checks.DefaultMaxChecks}
}

func (c *checksMain) checkFlags(fs *flag.FlagSet) {
	fs.IntVar(&c.MaxCheckProbes, "max-check-probes", c.MaxCheckProbes, "cap on health-check probes in flight")
	fs.IntVar(&c.MaxChecks, "max-checks", c.MaxChecks, "cap on checked registrations (kept in -data-dir/"+checksFile+")")
}

func (c *checksMain) validateChecks() error {
	switch {
	case c.MaxCheckProbes < 1:
		return fmt.Errorf("-max-check-probes %d: must be at least 1", c.MaxCheckProbes)
	case c.MaxChecks < 1:
		return fmt.Errorf("-max-checks %d: must be at least 1", c.MaxChecks)
	}
	return nil
}

// startChecks restores the checked registrations from the data dir and
// starts their checks, on the agent's kept session; after the agent,
// before the front ends (which take it as server.Options.Checks).
func (m *Main) startChecks() error {
	file := ""
	if m.DataDir != "" {
		file = filepath.Join(m.DataDir, checksFile)
	} else {
		m.Logger.Warn("no -data-dir: checked registrations are not kept across restarts")
	}
	c, err := checks.New(checks.Config{
		Registrar:   m.agent.NewKeptSession(),
		ExternalIP:  m.ExternalIP,
		File:        file,
		MaxInFlight: m.MaxCheckProbes,
		MaxChecks:   m.MaxChecks,
		Logger:      m.Logger.With("component", "checks"),
	})
	if err != nil {
		return err
	}
	m.checks = c
	return nil
}

// closeChecks stops the checks (before the agent); the registrations stay
// in the journal for the next start.
func (m *Main) closeChecks() error {
	if m.checks == nil {
		return nil
	}
	return m.checks.Close()
}
