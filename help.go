package main

import (
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/flynn/discoverd/api"
)

// envPrefix prefixes the environment variable of every agent flag:
// -data-dir is also DISCOVERD_DATA_DIR.
const envPrefix = "DISCOVERD_"

// envName is the environment variable that sets the agent flag name.
func envName(name string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// setFromEnv sets every flag of fs whose variable (envName) getenv
// returns non-empty, except those in skip (set on the command line, which
// wins). The error names the variable.
func setFromEnv(fs *flag.FlagSet, getenv func(string) string, skip map[string]bool) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || skip[f.Name] {
			return
		}
		env := envName(f.Name)
		if v := getenv(env); v != "" {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("invalid value %q for %s (flag -%s): %v", v, env, f.Name, e)
			}
		}
	})
	return err
}

// isHelp and isVersion recognise the help and version commands and flags.
func isHelp(arg string) bool {
	switch arg {
	case "help", "-h", "-help", "--help":
		return true
	}
	return false
}

func isVersion(arg string) bool {
	switch arg {
	case "version", "-version", "--version":
		return true
	}
	return false
}

// printHelp writes the help of `discoverd help` and `discoverd -h`: the
// commands, the environment and the agent's flags with their variables.
func printHelp(w io.Writer, getenv func(string) string) {
	fmt.Fprint(w, `discoverd is a service-discovery agent and its command-line client.

Usage:
  discoverd [flags]                        run the agent (flags below)
  discoverd [-agent ADDR] COMMAND [args]   talk to an agent

Commands:
`)
	for _, name := range slices.Sorted(maps.Keys(commands)) {
		c := commands[name]
		fmt.Fprintf(w, "  discoverd %s\n      %s\n", c.usage, c.help)
	}
	fmt.Fprintf(w, `  discoverd version
      print the version, VCS revision and Go version
  discoverd help
      print this help

Environment:
  DISCOVERD         agent address of the commands and of client libraries
                    (default %s; a tcp:// prefix is accepted,
                    https://host:port connects over TLS); -agent wins
  DISCOVERD_TOKEN   bearer token the commands and client libraries send
  DISCOVERD_CA_CERT, DISCOVERD_CLIENT_CERT, DISCOVERD_CLIENT_KEY
                    PEM files for TLS to the agent (https://): its CAs,
                    and a client certificate and key
  DISCOVERD_ETCD_PASSWORD  password of the agent's -etcd-user
  EXTERNAL_IP       the agent's IP for addresses given as ":port"
                    (-external-ip and DISCOVERD_EXTERNAL_IP win)
  DISCOVERD_<FLAG>  sets the agent flag -<flag> (upper case, dashes as
                    underscores: DISCOVERD_DATA_DIR=/var/lib/discoverd);
                    the flag on the command line wins
  XDG_STATE_HOME, HOME  locate the default -data-dir

Agent flags:
`, api.DefaultAgentAddr)
	m := NewMain()
	printFlags(w, m.flagSet(getenv))
}

// printFlags lists fs's flags like flag.PrintDefaults, with each flag's
// environment variable.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		arg, usage := flag.UnquoteUsage(f)
		line := "  -" + f.Name
		if arg != "" {
			line += " " + arg
		}
		fmt.Fprintln(w, line)
		fmt.Fprintf(w, "      %s\n", usage)
		def := ""
		if f.DefValue != "" && f.DefValue != "[]" {
			def = fmt.Sprintf("default %q, ", f.DefValue)
		}
		fmt.Fprintf(w, "      (%senv %s)\n", def, envName(f.Name))
	})
}
