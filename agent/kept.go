package agent

// NewKeptSession starts the session of the agent's own owner class: the
// registrations the agent keeps for a health check (package checks). They
// need no heartbeat and never expire by the TTL: the checker registers
// them while the check passes and unregisters them when it fails. Like a
// shared session it never takes over a registration of another session
// (CodeConflict), and no other shared session (HTTP) may take over or
// remove its registrations. It is not capped. The caller must call Close,
// which unregisters what it holds.
func (a *Agent) NewKeptSession() *Session {
	s := a.newSession(-1, true)
	s.kept = true // s is not shared with anyone yet
	return s
}
