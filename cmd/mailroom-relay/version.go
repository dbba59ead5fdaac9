package main

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"runtime"
	"runtime/debug"
	"strconv"

	"github.com/mailroom-go/mailroom"
)

// version is set at build time: go build -ldflags "-X main.version=v1.2.3".
// Otherwise it comes from the module version (go install …@v1.2.3) or is
// "devel".
var version = ""

const versionHelp = `Usage: mailroom-relay version

Prints the version, the Go version it was built with, and the mailroom
schema version this build migrates to.
`

func cmdVersion(args []string, stdout, stderr io.Writer) error {
	f := newFlagSet("version", versionHelp, stdout)
	if err := parse(f, args, stderr); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "mailroom-relay %s (%s, schema version %d)\n", buildVersion(), runtime.Version(), latestSchema())
	return nil
}

// latestSchema is the highest NNNN of the embedded migrations/NNNN_*.sql.
func latestSchema() int {
	files, _ := fs.Glob(mailroom.Migrations, "migrations/[0-9][0-9][0-9][0-9]_*.sql")
	latest := 0
	for _, f := range files {
		if n, err := strconv.Atoi(path.Base(f)[:4]); err == nil && n > latest {
			latest = n
		}
	}
	return latest
}

func buildVersion() string {
	if version != "" {
		return version
	}
	v := "devel"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += "+" + s.Value[:12]
			}
		}
	}
	return v
}
