package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// leak is the distinctive secret of these tests; needle is the part of it
// that must not appear, whole, cut short or percent-encoded.
const (
	leak   = "s3cr3t-XYZ"
	needle = "s3cr3t"
)

func noLeak(t *testing.T, what string, outputs ...string) {
	t.Helper()
	for _, out := range outputs {
		if strings.Contains(out, needle) {
			t.Errorf("%s: the secret shows:\n%s", what, out)
		}
	}
}

// Every form of connection string with a secret in it, through the binary
// as users run it: bad configuration, unreachable servers, help with the
// environment set. Nothing prints the secret.
func TestSecretsNeverPrinted(t *testing.T) {
	t.Parallel()
	goodDB := "postgres://root@127.0.0.1:5432/test?sslmode=disable"
	goodAMQP := testenv.AMQPURL()
	closed := "127.0.0.1:1"
	for _, c := range []struct {
		name       string
		db, amqp   string
		args       []string
		code       int
		wantInLine string // in the last stderr line
	}{
		// Bad configuration: exit 2.
		{"key=value DSN", "host=127.0.0.1 port=5432 user=root password=" + leak + " dbname=test sslmode=disable", "", []string{"status"}, 2, "password=xxxxx"},
		{"key=value DSN, quoted with spaces and quotes", `host=127.0.0.1 user=root password='` + leak + ` a\' b' dbname=test`, "", []string{"status"}, 2, "password=xxxxx"},
		{"key=value DSN, spaces around =", "host = 127.0.0.1 password = " + leak + " dbname=test", "", []string{"migrate"}, 2, "not a postgres:// URL"},
		{"URL without a scheme", "root:" + leak + "@127.0.0.1:5432/test", "", []string{"status"}, 2, "root:xxxxx@127.0.0.1"},
		{"other scheme", "mysql://root:" + leak + "@127.0.0.1/test?password=" + leak, "", []string{"status"}, 2, "not a postgres:// URL"},
		{"invalid port", "postgres://root:" + leak + "@127.0.0.1:bad/test", "", []string{"status"}, 2, "percent-encode"},
		{"unencoded slash in password", "postgres://root:" + leak + "/x@127.0.0.1/test", "", []string{"status"}, 2, "percent-encode"},
		{"bad escape", "postgres://root:" + leak + "%zz@127.0.0.1/test", "", []string{"dead", "list"}, 2, "percent-encode"},
		{"AMQP other scheme", goodDB, "http://guest:" + leak + "@127.0.0.1/?password=" + leak, []string{"run"}, 2, "is not an amqp:// or amqps:// URL"},
		{"AMQP without a scheme", goodDB, "guest:" + leak + "@127.0.0.1:5672/", []string{"run"}, 2, "is not an amqp:// or amqps:// URL"},
		{"AMQP invalid port", goodDB, "amqp://guest:" + leak + "@127.0.0.1:bad/", []string{"run"}, 2, "is not an amqp:// or amqps:// URL"},
		{"AMQP unencoded slash", goodDB, "amqp://guest:" + leak + "/x@127.0.0.1/", []string{"run"}, 2, "is not an amqp:// or amqps:// URL"},
		// Unreachable server: exit 1.
		{"unreachable, userinfo", "postgres://root:" + leak + "@" + closed + "/test?sslmode=disable", "", []string{"status"}, 1, "cannot reach PostgreSQL"},
		{"unreachable, ?password=", "postgres://root@" + closed + "/test?sslmode=disable&password=" + leak, "", []string{"migrate"}, 1, "password=xxxxx"},
		{"unreachable, ?sslpassword=", "postgres://root@" + closed + "/test?sslmode=disable&sslpassword=" + leak, "", []string{"dead", "list"}, 1, "sslpassword=xxxxx"},
		{"unreachable, percent-encoded", "postgresql://root:" + strings.ReplaceAll(leak, "-", "%2D") + "@" + closed + "/test?sslmode=disable", "", []string{"status", "--json"}, 1, "cannot reach PostgreSQL"},
		{"refused: no such database", "postgres://root:" + leak + "@127.0.0.1:5432/no_such_db?sslmode=disable&password=" + leak, "", []string{"status"}, 1, "cannot reach PostgreSQL"},
		// Help, with the secrets in the environment: exit 0.
		{"run -h", goodDB + "&password=" + leak, "amqp://guest:" + leak + "@127.0.0.1/", []string{"run", "-h"}, 0, ""},
		{"status -h", goodDB + "&password=" + leak, "", []string{"status", "-h"}, 0, ""},
		{"dead list -h", goodDB + "&password=" + leak, "", []string{"dead", "list", "-h"}, 0, ""},
		{"migrate -h", goodDB + "&password=" + leak, "", []string{"migrate", "-h"}, 0, ""},
		{"-h", goodDB + "&password=" + leak, "", []string{"-h"}, 0, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			env := []string{"DATABASE_URL=" + c.db, "MAILROOM_ADMIN_TOKEN=" + leak + "-0123456789"}
			if c.amqp != "" {
				env = append(env, "AMQP_URL="+c.amqp)
			} else {
				env = append(env, "AMQP_URL="+goodAMQP)
			}
			r := runBin(t, cleanEnv(env...), c.args...)
			noLeak(t, c.name, r.stdout, r.stderr)
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			if last := lines[len(lines)-1]; r.code != c.code || !strings.Contains(last, c.wantInLine) {
				t.Errorf("exit %d, last line %q; want exit %d and %q", r.code, last, c.code, c.wantInLine)
			}
		})
	}
}

// A running sidecar whose URLs hold secrets (the local server trusts every
// connection, so they work; the broker is unreachable, so its error shows):
// no log line, probe, metric or status page shows them, nor do status and
// dead list.
func TestRunningSidecarHidesSecrets(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	dbURL := withPassword(t, s.URL, leak) + "&password=" + leak
	amqpURL := "amqp://guest:" + leak + "@127.0.0.1:1/?token=" + leak
	sc := startSidecarEnv(t, []string{"AMQP_URL=" + amqpURL}, dbURL, "--amqp-url", amqpURL, "--admin-token", leak+"-0123456789")
	var starting string
	testenv.Eventually(t, time.Minute, `the "relay starting" line and a broker error`, func() bool {
		for _, l := range sc.lines() {
			var line struct{ Msg string }
			if json.Unmarshal([]byte(l), &line) == nil && line.Msg == "relay starting" {
				starting = l
			}
		}
		_, body := sc.get("/readyz")
		return starting != "" && strings.Contains(body, "127.0.0.1:1")
	})
	if !strings.Contains(starting, "guest:xxxxx@127.0.0.1:1") || !strings.Contains(starting, "token=xxxxx") || !strings.Contains(starting, "password=xxxxx") {
		t.Errorf("relay starting line does not show the redacted URLs: %s", starting)
	}
	for _, path := range []string{"/", "/readyz", "/healthz", "/metrics"} {
		_, body := sc.get(path)
		noLeak(t, path, body)
	}
	env := cleanEnv("DATABASE_URL=" + dbURL)
	for _, args := range [][]string{{"status"}, {"status", "--json"}, {"dead", "list"}} {
		r := runBin(t, env, args...)
		if r.code != 0 {
			t.Errorf("%v: exit %d: %s", args, r.code, r.stderr)
		}
		noLeak(t, strings.Join(args, " "), r.stdout, r.stderr)
	}
	// Tables missing: the error names the database.
	empty := testenv.NewEmptySchema(t)
	r := runBin(t, cleanEnv("DATABASE_URL="+withPassword(t, empty.URL, leak)+"&password="+leak), "status")
	if r.code != 1 || !strings.Contains(r.stderr, "mailroom-relay migrate") {
		t.Errorf("status without tables: exit %d: %s", r.code, r.stderr)
	}
	noLeak(t, "status without tables", r.stdout, r.stderr)
	sc.stop()
	noLeak(t, "logs", sc.lines()...)
}
