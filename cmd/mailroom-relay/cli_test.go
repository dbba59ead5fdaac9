package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

const secret = "pw-Secret-4711"

// TestBadInput checks every command's bad-input path: exit status 2 with
// one line naming the problem, and no password in the output.
func TestBadInput(t *testing.T) {
	t.Parallel()
	db := "postgres://root:" + secret + "@127.0.0.1:5432/test?sslmode=disable"
	amqp := "amqp://guest:" + secret + "@127.0.0.1:5672/"
	id := outbox.NewID()
	cases := []struct {
		name string
		env  []string
		args []string
		want string // in the one line
	}{
		{"unknown command", nil, []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"no DATABASE_URL", nil, []string{"status"}, "DATABASE_URL is not set"},
		{"DATABASE_URL not postgres", []string{"DATABASE_URL=mysql://root:" + secret + "@h/db"}, []string{"status"}, "not a postgres:// URL"},
		{"DATABASE_URL bad escape", []string{"DATABASE_URL=postgres://root:" + secret + "%zz@h/db"}, []string{"status"}, "percent-encode"},
		{"run bad MAILROOM_NO_LISTEN", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_NO_LISTEN=sure"}, []string{"run"}, "MAILROOM_NO_LISTEN"},
		{"run tiny maintenance interval", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--maintenance-interval", "1ns"}, "--maintenance-interval"},
		{"run dedupe retention removed", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--dedupe-retention", "168h"}, "--purge-inbox payments=168h"},
		{"run dedupe retention removed (env)", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_DEDUPE_RETENTION=720h"}, []string{"run"}, "--dedupe-retention (MAILROOM_DEDUPE_RETENTION) was removed"},
		{"run purge inbox without retention", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--purge-inbox", "payments"}, "want consumer=retention"},
		{"run purge inbox of seconds", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--purge-inbox", "payments=1s"}, "at least 1h0m0s"},
		{"run purge inbox without consumer", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--purge-inbox", "=168h"}, "no consumer name"},
		{"run purge inbox twice", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--purge-inbox", "a=2h", "--purge-inbox", "a=3h"}, `consumer "a" named twice`},
		{"run bad MAILROOM_PURGE_INBOX", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_PURGE_INBOX=payments=168h,orders=soon"}, []string{"run"}, `MAILROOM_PURGE_INBOX: "orders=soon"`},
		{"run tiny confirm timeout", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--confirm-timeout", "3ns"}, "--confirm-timeout (MAILROOM_CONFIRM_TIMEOUT) 3ns: must be at least 100ms"},
		{"run negative min backoff", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--min-backoff", "-1s"}, "--min-backoff (MAILROOM_MIN_BACKOFF) -1s"},
		{"bad table name", []string{"DATABASE_URL=" + db}, []string{"status", "--outbox-table", "no;such"}, "Tables.Outbox"},
		{"bad log level", []string{"DATABASE_URL=" + db}, []string{"migrate", "--log-level", "loud"}, "--log-level"},
		{"unknown flag", []string{"DATABASE_URL=" + db}, []string{"migrate", "--nope"}, "flag provided but not defined"},
		{"stray argument", []string{"DATABASE_URL=" + db}, []string{"status", "extra"}, `unexpected argument "extra"`},
		{"run without AMQP_URL", []string{"DATABASE_URL=" + db}, []string{"run"}, "AMQP_URL is not set"},
		{"run AMQP_URL not amqp", []string{"DATABASE_URL=" + db, "AMQP_URL=http://guest:" + secret + "@h/"}, []string{"run"}, "is not an amqp:// or amqps:// URL"},
		{"run bad --http", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--http", "9108"}, "--http"},
		{"run short token", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_ADMIN_TOKEN=short"}, []string{"run"}, "--admin-token"},
		{"run bad env number", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_BATCH_SIZE=lots"}, []string{"run"}, "MAILROOM_BATCH_SIZE"},
		{"run bad env duration", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_MAINTENANCE_INTERVAL=often"}, []string{"run"}, "MAILROOM_MAINTENANCE_INTERVAL"},
		{"flag overrides a bad env value", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_BATCH_SIZE=lots"}, []string{"run", "--batch-size", "10", "--admin-token", "short"}, "--admin-token"},
		{"run window below batch", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_CONFIRM_WINDOW=100"}, []string{"run"}, "--confirm-window (MAILROOM_CONFIRM_WINDOW) 100 cannot be smaller than --batch-size (MAILROOM_BATCH_SIZE) (500)"},
		{"run too many active relays", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_ACTIVE_RELAYS=100"}, []string{"run"}, "--active-relays (MAILROOM_ACTIVE_RELAYS) 100: must be between 1 and 64"},
		{"run bad MAILROOM_MAX_MESSAGE_SIZE", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_MAX_MESSAGE_SIZE=16MiB"}, []string{"run"}, "MAILROOM_MAX_MESSAGE_SIZE"},
		{"run bad --max-message-size", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--max-message-size", "big"}, "-max-message-size"},
		{"run bad CloudEvents prefix", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--cloudevents-source", "/orders", "--cloudevents-prefix", "ce_"}, `--cloudevents-prefix (MAILROOM_CLOUDEVENTS_PREFIX) "ce_": use cloudEvents_, cloudEvents:, ce-`},
		{"run CloudEvents prefix without source", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp, "MAILROOM_CLOUDEVENTS_PREFIX=ce-"}, []string{"run"}, "without --cloudevents-source"},
		{"run max message size over RabbitMQ's limit", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--max-message-size", "1073741824"}, "--max-message-size (MAILROOM_MAX_MESSAGE_SIZE) 1073741824: must be between 1 and 536870912"},
		{"run bad purge batch", []string{"DATABASE_URL=" + db, "AMQP_URL=" + amqp}, []string{"run", "--purge-batch", "0"}, "--purge-batch"},
		{"dead without subcommand", nil, []string{"dead"}, "missing subcommand"},
		{"dead unknown subcommand", nil, []string{"dead", "resurrect"}, `unknown subcommand "resurrect"`},
		{"dead list bad limit", []string{"DATABASE_URL=" + db}, []string{"dead", "list", "--limit", "0"}, "--limit"},
		{"dead replay no ids", []string{"DATABASE_URL=" + db}, []string{"dead", "replay"}, "no ids"},
		{"dead replay ids and --all", []string{"DATABASE_URL=" + db}, []string{"dead", "replay", "--all", id}, "not both"},
		{"dead replay not a uuid", []string{"DATABASE_URL=" + db}, []string{"dead", "replay", id, "nope"}, `"nope" is not a message id`},
		{"dead discard no ids", []string{"DATABASE_URL=" + db}, []string{"dead", "discard"}, "no ids"},
		{"dead discard --all", []string{"DATABASE_URL=" + db}, []string{"dead", "discard", "--all"}, "flag provided but not defined: -all"},
		{"version extra", nil, []string{"version", "x"}, "unexpected argument"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := runBin(t, cleanEnv(c.env...), c.args...)
			if r.code != 2 {
				t.Fatalf("exit %d, want 2; stderr: %s", r.code, r.stderr)
			}
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "mailroom-relay: ") || !strings.Contains(last, c.want) {
				t.Fatalf("last stderr line %q, want it to contain %q", last, c.want)
			}
			if c.name != "dead without subcommand" && len(lines) != 1 {
				t.Fatalf("want one line, got:\n%s", r.stderr)
			}
			if strings.Contains(r.stdout+r.stderr, secret) {
				t.Fatalf("password in output:\n%s%s", r.stdout, r.stderr)
			}
			t.Log(last)
		})
	}
}

// Help asked for goes to stdout with exit 0 (so `mailroom-relay help | less`
// works); help not asked for (no command) is an error: stderr, exit 2.
func TestHelp(t *testing.T) {
	t.Parallel()
	if r := runBin(t, cleanEnv()); r.code != 2 || !strings.Contains(r.stderr, "Commands:") || r.stdout != "" {
		t.Fatalf("no arguments: exit %d, want 2 and the usage on stderr; stdout: %q, stderr: %s", r.code, r.stdout, r.stderr)
	}
	for _, asked := range []string{"-h", "--help", "help"} {
		r := runBin(t, cleanEnv(), asked)
		if r.code != 0 || r.stderr != "" {
			t.Fatalf("%s: exit %d, stderr %q; want 0 and nothing on stderr", asked, r.code, r.stderr)
		}
		for _, cmd := range []string{"migrate", "run", "status", "dead", "version", "healthcheck", "help"} {
			if !strings.Contains(r.stdout, "\n  "+cmd) {
				t.Errorf("%s: usage does not list %s:\n%s", asked, cmd, r.stdout)
			}
		}
	}
	for _, args := range [][]string{
		{"migrate", "-h"}, {"run", "-h"}, {"status", "-h"}, {"dead", "-h"},
		{"dead", "list", "-h"}, {"dead", "replay", "-h"}, {"dead", "discard", "--help"}, {"version", "-h"},
		{"healthcheck", "-h"}, {"help", "run"}, {"help", "dead", "replay"}, {"help", "status"},
	} {
		r := runBin(t, cleanEnv(), args...)
		cmd := args
		if cmd[0] == "help" {
			cmd = cmd[1:]
		}
		want := "Usage: mailroom-relay " + cmd[0]
		if cmd[0] == "dead" && len(cmd) > 1 && cmd[1] != "-h" {
			want += " " + cmd[1]
		}
		if r.code != 0 || !strings.Contains(r.stdout, want) {
			t.Errorf("%v: exit %d, want 0 and %q on stdout:\n%s\nstderr: %s", args, r.code, want, r.stdout, r.stderr)
		}
	}
	if r := runBin(t, cleanEnv(), "help", "run"); !strings.Contains(r.stdout, "-admin-token") || !strings.Contains(r.stdout, "/readyz") || !strings.Contains(r.stdout, "-purge-inbox") || !strings.Contains(r.stdout, "-max-message-size") || !strings.Contains(r.stdout, "$MAILROOM_MAX_MESSAGE_SIZE") {
		t.Errorf("help run does not document --admin-token, /readyz, --purge-inbox and --max-message-size:\n%s", r.stdout)
	}
	if r := runBin(t, cleanEnv(), "dead", "replay", "-h"); !strings.Contains(r.stdout, "END of its key") {
		t.Errorf("dead replay -h does not say what replay does to per-key order:\n%s", r.stdout)
	}
	if r := runBin(t, cleanEnv(), "help", "nonsense"); r.code != 2 || !strings.Contains(r.stderr, `unknown command "nonsense"`) {
		t.Errorf("help nonsense: exit %d, stderr %q; want 2 naming the command", r.code, r.stderr)
	}
}

// A malformed database setting is a configuration error (exit 2) naming
// the variable, not "is it running?", and never shows the password.
func TestBadDatabaseSettingIsAConfigurationError(t *testing.T) {
	t.Parallel()
	const leak = "s3cret-pw"
	for _, args := range [][]string{{"status"}, {"migrate"}, {"dead", "list"}} {
		r := runBin(t, cleanEnv("DATABASE_URL=postgres://root:"+leak+"@127.0.0.1:5432/test?sslmode=bogus"), args...)
		if r.code != 2 || !strings.Contains(r.stderr, "DATABASE_URL") || !strings.Contains(r.stderr, "sslmode") || strings.Contains(r.stderr, "is it running") {
			t.Errorf("%v with sslmode=bogus: exit %d, stderr %q; want 2, naming DATABASE_URL and sslmode", args, r.code, r.stderr)
		}
		if strings.Contains(r.stderr+r.stdout, leak) {
			t.Errorf("%v: the password is printed: %s", args, r.stderr)
		}
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	r := runBin(t, cleanEnv(), "version")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "mailroom-relay ") || !strings.Contains(r.stdout, "schema version") {
		t.Fatalf("version: exit %d, stdout %q", r.code, r.stdout)
	}
}

// TestDatabaseUnreachable: a runtime failure exits 1 and hides the password.
func TestDatabaseUnreachable(t *testing.T) {
	t.Parallel()
	db := "postgres://root:" + secret + "@127.0.0.1:1/test?sslmode=disable"
	for _, args := range [][]string{{"migrate"}, {"status"}, {"dead", "list"}, {"dead", "discard", outbox.NewID()}} {
		r := runBin(t, cleanEnv("DATABASE_URL="+db), args...)
		if r.code != 1 || !strings.Contains(r.stderr, "cannot reach PostgreSQL") {
			t.Errorf("%v: exit %d, want 1 with \"cannot reach PostgreSQL\"; stderr: %s", args, r.code, r.stderr)
		}
		if strings.Contains(r.stderr, secret) || !strings.Contains(r.stderr, "xxxxx") {
			t.Errorf("%v: password not redacted: %s", args, r.stderr)
		}
	}
}

// TestMigrateStatusAndDeadCommands drives migrate, status and the dead
// commands through their happy paths and their data errors.
func TestMigrateStatusAndDeadCommands(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	env := cleanEnv("DATABASE_URL=" + withPassword(t, s.URL, secret))
	check := func(r result, code int, what string) result {
		t.Helper()
		if r.code != code {
			t.Fatalf("%s: exit %d, want %d\nstdout: %s\nstderr: %s", what, r.code, code, r.stdout, r.stderr)
		}
		if strings.Contains(r.stdout+r.stderr, secret) {
			t.Fatalf("%s: password in output:\n%s%s", what, r.stdout, r.stderr)
		}
		return r
	}

	r := check(runBin(t, env, "status"), 1, "status before migrate")
	if !strings.Contains(r.stderr, "mailroom-relay migrate") {
		t.Fatalf("status before migrate should say to run migrate: %s", r.stderr)
	}
	r = check(runBin(t, env, "migrate"), 0, "migrate")
	if !strings.Contains(r.stdout, "schema version") {
		t.Fatalf("migrate output %q", r.stdout)
	}
	check(runBin(t, env, "migrate"), 0, "migrate again")

	var st map[string]any
	r = check(runBin(t, env, "status", "--json"), 0, "status --json (empty)")
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status --json: %v: %q", err, r.stdout)
	}
	for _, k := range []string{"pending", "oldest_pending_age_seconds", "dead"} {
		if v, ok := st[k].(float64); !ok || v != 0 {
			t.Fatalf("empty status %s = %#v, want 0: %s", k, st[k], r.stdout)
		}
	}
	r = check(runBin(t, env, "dead", "list"), 0, "dead list (empty)")
	if strings.TrimSpace(r.stdout) != "no dead letters" {
		t.Fatalf("dead list (empty): %q", r.stdout)
	}
	r = check(runBin(t, env, "dead", "list", "--json"), 0, "dead list --json (empty)")
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("dead list --json (empty): %q, want []", r.stdout)
	}

	ids := addMessages(t, s,
		outbox.Message{Exchange: "orders", RoutingKey: "order.placed", Key: "order-1"},
		outbox.Message{Exchange: "orders", RoutingKey: "order.paid", Key: "order-1"},
		outbox.Message{Exchange: "orders", RoutingKey: "order.placed", Key: "order-2"},
		outbox.Message{Exchange: "orders", RoutingKey: "later", AvailableAt: time.Now().Add(time.Hour)},
	)
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET created_at = now() - interval '42 seconds', available_at = now() - interval '42 seconds' WHERE id = $1`, ids[2]); err != nil {
		t.Fatal(err)
	}
	bury(t, s, "relay: unroutable: no queue bound\nfor exchange", ids[0], ids[1])

	r = check(runBin(t, env, "status", "--json"), 0, "status --json")
	var got struct {
		Pending   int64   `json:"pending"`
		Scheduled int64   `json:"scheduled"`
		Age       float64 `json:"oldest_pending_age_seconds"`
		Dead      int64   `json:"dead"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatal(err)
	}
	if got.Pending != 2 || got.Scheduled != 1 || got.Dead != 2 || got.Age < 42 || got.Age > 3600 {
		t.Fatalf("status --json: %s; want pending 2, scheduled 1, dead 2, age about 42", r.stdout)
	}
	r = check(runBin(t, env, "status"), 0, "status")
	if !strings.Contains(r.stdout, "pending             2") || !strings.Contains(r.stdout, "dead letters        2") {
		t.Fatalf("status:\n%s", r.stdout)
	}

	r = check(runBin(t, env, "dead", "list"), 0, "dead list")
	for _, want := range []string{ids[0], ids[1], "order.paid", "order-1", "relay: unroutable: no queue bound for exchange", "ATTEMPTS"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("dead list lacks %q:\n%s", want, r.stdout)
		}
	}
	r = check(runBin(t, env, "dead", "list", "--limit", "1"), 0, "dead list --limit 1")
	if !strings.Contains(r.stdout, "(1 of 2 shown") || strings.Contains(r.stdout, ids[1]) {
		t.Fatalf("dead list --limit 1:\n%s", r.stdout)
	}
	r = check(runBin(t, env, "dead", "list", "--json"), 0, "dead list --json")
	var dead []struct {
		ID, Exchange string
		LastError    string `json:"last_error"`
		RoutingKey   string `json:"routing_key"`
		Key          string
		Attempts     int
		DeadAt       time.Time `json:"dead_at"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &dead); err != nil {
		t.Fatal(err)
	}
	if len(dead) != 2 || dead[1].ID != ids[1] || dead[1].Exchange != "orders" || dead[1].RoutingKey != "order.paid" ||
		dead[1].Key != "order-1" || dead[1].Attempts != 3 || !strings.Contains(dead[1].LastError, "unroutable") || dead[1].DeadAt.IsZero() {
		t.Fatalf("dead list --json: %s", r.stdout)
	}

	// An unknown id changes nothing, and says which.
	unknown := outbox.NewID()
	r = check(runBin(t, env, "dead", "replay", ids[0], unknown), 1, "replay with an unknown id")
	if !strings.Contains(r.stderr, unknown) || !strings.Contains(r.stderr, "nothing was replayed") {
		t.Fatalf("replay unknown: %s", r.stderr)
	}
	r = check(runBin(t, env, "dead", "discard", unknown), 1, "discard an unknown id")
	if !strings.Contains(r.stderr, unknown) {
		t.Fatalf("discard unknown: %s", r.stderr)
	}
	var n int
	if err := s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox_dead`); err != nil || n != 2 {
		t.Fatalf("dead rows after failed commands: %d, %v; want 2", n, err)
	}

	// Flags after ids work too.
	r = check(runBin(t, cleanEnv(), "dead", "replay", ids[0], "--database-url", withPassword(t, s.URL, secret)), 0, "replay")
	if !strings.Contains(r.stdout, "replayed 1") {
		t.Fatalf("replay: %q", r.stdout)
	}
	var attempts int
	if err := s.DB.Get(&attempts, `SELECT attempts FROM mailroom_outbox WHERE id = $1`, ids[0]); err != nil || attempts != 0 {
		t.Fatalf("replayed row: attempts %d, %v; want the row back with 0", attempts, err)
	}
	r = check(runBin(t, env, "dead", "discard", ids[1]), 0, "discard")
	if !strings.Contains(r.stdout, "discarded 1") {
		t.Fatalf("discard: %q", r.stdout)
	}
	r = check(runBin(t, env, "dead", "replay", "--all"), 0, "replay --all (none left)")
	if !strings.Contains(r.stdout, "replayed 0") {
		t.Fatalf("replay --all: %q", r.stdout)
	}
	if err := s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox_dead`); err != nil || n != 0 {
		t.Fatalf("dead rows at the end: %d, %v; want 0", n, err)
	}
}

// Ctrl-C during `dead replay --all` stops it: it says how many rows it
// moved, and each row is either back in the outbox or still a dead letter.
func TestReplayAllInterrupted(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	const n = 300000 // a few seconds of batches
	s.DB.MustExec(`INSERT INTO mailroom_outbox_dead (seq, id, exchange, routing_key, payload, created_at, attempts, last_error)
SELECT nextval(pg_get_serial_sequence('mailroom_outbox', 'seq')), gen_random_uuid(), 'x', 'r', '{}', now(), 7, 'nack'
FROM generate_series(1, $1)`, n)
	cmd := exec.Command(bin, "dead", "replay", "--all")
	cmd.Env = cleanEnv("DATABASE_URL=" + s.URL)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, time.Minute, "the replay under way", func() bool {
		var k int
		return s.DB.Get(&k, `SELECT count(*) FROM mailroom_outbox`) == nil && k > 0
	})
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("exit %v, want status 1; stderr %q", err, stderr.String())
	}
	var moved int
	if _, err := fmt.Sscanf(stderr.String()[strings.Index(stderr.String(), "(")+1:], "%d replayed before", &moved); err != nil {
		t.Fatalf("stderr %q does not say how many were replayed: %v", stderr.String(), err)
	}
	var back, dead int
	if err := s.DB.Get(&back, `SELECT count(*) FROM mailroom_outbox`); err != nil {
		t.Fatal(err)
	}
	if err := s.DB.Get(&dead, `SELECT count(*) FROM mailroom_outbox_dead`); err != nil {
		t.Fatal(err)
	}
	if back != moved || back+dead != n || moved == n {
		t.Fatalf("said %d replayed; %d rows back in the outbox and %d still dead (of %d)", moved, back, dead, n)
	}
}

// dead show prints one dead letter whole; dead list and dead replay --all
// take filters; filters without --all on replay are refused.
func TestDeadShowAndFilters(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ids := addMessages(t, s,
		outbox.Message{Exchange: "orders", RoutingKey: "r", Type: "order.placed", Headers: map[string]string{"tenant": "acme"}, Payload: []byte(`{"amount":1299}`)},
		outbox.Message{Exchange: "billing", RoutingKey: "r", Type: "invoice.sent"},
	)
	bury(t, s, "relay: exchange does not exist: \"orders\"", ids[0])
	bury(t, s, "relay: nacked by the broker", ids[1])
	env := cleanEnv("DATABASE_URL=" + s.URL)

	r := runBin(t, env, "dead", "show", ids[0])
	for _, want := range []string{ids[0], "orders", "order.placed", "header tenant", "acme", `{"amount":1299}`, "exchange does not exist"} {
		if r.code != 0 || !strings.Contains(r.stdout, want) {
			t.Errorf("dead show: exit %d, %q missing from:\n%s%s", r.code, want, r.stdout, r.stderr)
		}
	}
	r = runBin(t, env, "dead", "show", "--json", ids[0])
	var shown struct {
		ID      string            `json:"id"`
		Headers map[string]string `json:"headers"`
		Payload []byte            `json:"payload"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &shown); err != nil || shown.ID != ids[0] || shown.Headers["tenant"] != "acme" || string(shown.Payload) != `{"amount":1299}` {
		t.Errorf("dead show --json: %v, %s", err, r.stdout)
	}
	if r := runBin(t, env, "dead", "show", outbox.NewID()); r.code != 1 || !strings.Contains(r.stderr, "no dead letter") {
		t.Errorf("dead show of an unknown id: exit %d, %s", r.code, r.stderr)
	}

	r = runBin(t, env, "dead", "list", "--exchange", "billing")
	if r.code != 0 || !strings.Contains(r.stdout, ids[1]) || strings.Contains(r.stdout, ids[0]) {
		t.Errorf("dead list --exchange billing: exit %d:\n%s", r.code, r.stdout)
	}
	r = runBin(t, env, "dead", "list", "--error", "nacked", "--newer-than", "1h", "--json")
	if r.code != 0 || !strings.Contains(r.stdout, ids[1]) || strings.Contains(r.stdout, ids[0]) {
		t.Errorf("dead list --error nacked: exit %d:\n%s", r.code, r.stdout)
	}
	if r := runBin(t, env, "dead", "list", "--older-than", "2h", "--newer-than", "1h"); r.code != 2 {
		t.Errorf("dead list with an empty age range: exit %d, want 2", r.code)
	}
	if r := runBin(t, env, "dead", "replay", "--exchange", "orders"); r.code != 2 || !strings.Contains(r.stderr, "--all") {
		t.Errorf("dead replay with a filter and no --all: exit %d, %s", r.code, r.stderr)
	}
	r = runBin(t, env, "dead", "replay", "--all", "--exchange", "orders")
	if r.code != 0 || !strings.Contains(r.stdout, "replayed 1 dead letter") {
		t.Fatalf("dead replay --all --exchange orders: exit %d, %s%s", r.code, r.stdout, r.stderr)
	}
	var left []string
	if err := s.DB.Select(&left, `SELECT id::text FROM mailroom_outbox_dead`); err != nil || len(left) != 1 || left[0] != ids[1] {
		t.Fatalf("left dead: %v (%v), want only %s", left, err, ids[1])
	}
}
