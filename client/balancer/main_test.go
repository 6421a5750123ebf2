package balancer_test

import (
	"os"
	"testing"

	"github.com/flynn/discoverd/client/internal/agenttest"
)

// The example runs against a real agent (see agenttest); the tests need
// none (staticSet).
func TestMain(m *testing.M) { os.Exit(agenttest.Main(m)) }
