package relay_test

import (
	"net/url"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// insertRaw writes a row by plain SQL, as a service without outbox.Add
// (or an operator) would, and returns its id.
func (e *env) insertRaw(exchange, routingKey, key string, payload []byte) string {
	e.t.Helper()
	id := outbox.NewID()
	if _, err := e.s.DB.Exec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, key, content_type, payload) VALUES ($1, $2, $3, $4, 'application/octet-stream', $5)`, id, exchange, routingKey, key, payload); err != nil {
		e.t.Fatal(err)
	}
	return id
}

// deadError waits for the dead letter of id and returns its attempts and
// last error.
func (e *env) deadError(id string) (attempts int, lastError string) {
	e.t.Helper()
	testenv.Eventually(e.t, 30*time.Second, "the dead letter of "+id, func() bool {
		return e.s.DB.QueryRow(`SELECT attempts, last_error FROM mailroom_outbox_dead WHERE id = $1`, id).Scan(&attempts, &lastError) == nil
	})
	return attempts, lastError
}

// notFinal matches a stored error that speaks of trying again: a dead
// letter's error is its last word.
var notFinal = regexp.MustCompile(`(?i)retried|retry|tries again|try again|stays in the outbox`)

// A row over Config.MaxMessageSize fails as an attempt without being sent
// and is dead-lettered with an error naming its size and the limit; the
// next row of its key follows, and unkeyed rows flow meanwhile.
func TestRowOverMaxMessageSizeIsDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	big := e.insertRaw(e.ex, "k", "K", make([]byte, 2048))
	want := map[string]bool{e.insertRaw(e.ex, "k", "K", []byte("next")): true}
	for range 5 {
		want[e.insertRaw(e.ex, "k", "", []byte("small"))] = true
	}
	cfg := e.config()
	cfg.MaxAttempts, cfg.MaxMessageSize = 2, 1024
	stop := e.start(cfg)
	e.consumeAll(e.queue, want, 30*time.Second)
	attempts, lastError := e.deadError(big)
	if attempts != 2 || !strings.Contains(lastError, "Payload: 2048 bytes") || !strings.Contains(lastError, "MaxMessageSize of 1024") {
		t.Errorf("dead letter: %d attempts, error %q; want 2, naming the size and MaxMessageSize", attempts, lastError)
	}
	if notFinal.MatchString(lastError) {
		t.Errorf("dead letter's error %q speaks of retrying", lastError)
	}
	e.waitDrained()
	stop()
	// Released: at most the next row of its key, handed back unpublished
	// behind it at each attempt when it came in the same claim (see
	// chains.go); a row sent and refused by the broker would hand back
	// every unconfirmed row of the channel too.
	if s := e.relays[0].Stats(); s.Released > 2 || s.Failed != 2 {
		t.Errorf("stats %+v: want 2 failed attempts, and at most the row behind it handed back at each", s)
	}
}

// A routing key the relay user's topic permissions refuse (403 "access to
// topic", which closes the channel) counts attempts and is dead-lettered;
// the rows beside it flow. It used to be released at every channel close,
// and head the next claim again.
func TestTopicPermissionRefusalCountsAttempts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	user, pass := testenv.Unique("relayuser"), "pw"
	ctl := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("rabbitmqctl", append([]string{"-q"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("rabbitmqctl %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ctl("add_user", user, pass)
	t.Cleanup(func() { exec.Command("rabbitmqctl", "-q", "delete_user", user).Run() })
	ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
	ctl("set_topic_permissions", "-p", "/", user, e.ex, `^ok\.`, `^ok\.`)
	refused := outbox.NewID()
	msgs := []outbox.Message{{ID: refused, Exchange: e.ex, RoutingKey: "secret.x", Payload: []byte(`{}`)}}
	want := map[string]bool{}
	for range 5 {
		id := outbox.NewID()
		want[id] = true
		msgs = append(msgs, outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "ok.x", Payload: []byte(`{}`)})
	}
	e.add(msgs...)
	cfg := e.config()
	u, _ := url.Parse(e.b.URL)
	u.User = url.UserPassword(user, pass)
	cfg.URL, cfg.MaxAttempts = u.String(), 3
	stop := e.start(cfg)
	e.consumeAll(e.queue, want, 30*time.Second)
	attempts, lastError := e.deadError(refused)
	if attempts != 3 || !strings.Contains(lastError, "secret.x") || !strings.Contains(lastError, "access to topic") {
		t.Errorf("dead letter: %d attempts, error %q; want 3, naming the refused routing key", attempts, lastError)
	}
	if notFinal.MatchString(lastError) {
		t.Errorf("dead letter's error %q speaks of retrying", lastError)
	}
	e.waitDrained()
	stop()
	if s := e.relays[0].Stats(); s.Failed != 3 || s.DeadLettered != 1 {
		t.Errorf("stats %+v, want 3 failed attempts and 1 dead letter", s)
	}
}

// A dead letter's stored error reads as final: it used to keep the
// "stays in the outbox and is retried" of the attempt that buried it.
func TestDeadLetterErrorReadsFinal(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	missing := testenv.Unique("nope")
	id := outbox.NewID()
	e.add(outbox.Message{ID: id, Exchange: missing, RoutingKey: "x", Payload: []byte(`{}`)})
	cfg := e.config()
	cfg.MaxAttempts = 2
	e.start(cfg)
	_, lastError := e.deadError(id)
	if !strings.Contains(lastError, "exchange does not exist") || notFinal.MatchString(lastError) {
		t.Errorf("dead letter's error %q: want the missing exchange, and nothing about retrying", lastError)
	}
}
