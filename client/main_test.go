package discoverd_test

import (
	"os"
	"testing"

	"github.com/flynn/discoverd/client/internal/agenttest"
)

// The examples run against a real agent (see agenttest); the client's
// tests that need the agent's internals are in the main module, in
// internal/clienttest.
func TestMain(m *testing.M) { os.Exit(agenttest.Main(m)) }
