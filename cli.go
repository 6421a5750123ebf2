package main

import (
	"context"
	"io"
)

// isCommand reports whether name is a CLI subcommand (register, services,
// watch, leader) rather than the agent's flags.
func isCommand(name string) bool { return false }

// runCommand runs the CLI subcommand args[0] with args[1:], reading the
// environment through getenv, and returns the process exit code.
func runCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	return 2
}
