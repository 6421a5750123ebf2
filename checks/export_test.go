package checks

import "github.com/jonboulle/clockwork"

// NewWithClock is New with the clock of intervals, rise/fall, flapping
// and deregister_after set to c (a clockwork.FakeClock in tests).
func NewWithClock(cfg Config, c clockwork.Clock) (*Manager, error) { return newManager(cfg, c) }
