package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// TestRunPublishesAndServes: probes, metrics (parsed with the Prometheus
// text parser) and JSON logs without passwords.
func TestRunPublishesAndServes(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	// Many attempts: the row with a missing exchange below must stay
	// pending, not be dead-lettered.
	sc := startSidecar(t, withPassword(t, s.URL, secret), "--max-attempts", "1000000")
	sc.waitReady()
	if code, body := sc.get("/healthz"); code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	var ready struct {
		Ready  bool
		Checks map[string]string
	}
	_, body := sc.get("/readyz")
	if err := json.Unmarshal([]byte(body), &ready); err != nil || !ready.Ready || ready.Checks["database"] != "ok" || ready.Checks["broker"] != "ok" || ready.Checks["relay"] != "ok" {
		t.Fatalf("/readyz body %s (%v)", body, err)
	}

	// A scheduled row stays pending: the gauges must show it.
	addMessages(t, s, outbox.Message{Exchange: ex, RoutingKey: "later", AvailableAt: time.Now().Add(time.Hour)})
	var msgs []outbox.Message
	for i := range 50 {
		msgs = append(msgs, outbox.Message{Exchange: ex, RoutingKey: "order.placed", Key: fmt.Sprint("k", i%5)})
	}
	ids := addMessages(t, s, msgs...)
	receiveIDs(t, b, q, ids, time.Minute)
	testenv.Eventually(t, 30*time.Second, "published_total to reach 50", func() bool {
		return sc.value("mailroom_relay_published_total") == 50
	})
	m := sc.metrics()
	for _, c := range []struct {
		name  string
		match []string
		want  float64
	}{
		{"mailroom_outbox_pending_rows", []string{"table=mailroom_outbox"}, 1},
		{"mailroom_outbox_scheduled_rows", []string{"table=mailroom_outbox"}, 1},
		{"mailroom_outbox_oldest_pending_age_seconds", []string{"table=mailroom_outbox"}, 0}, // the only pending row is not due
		{"mailroom_outbox_dead_rows", nil, 0},
		{"mailroom_outbox_status_errors_total", nil, 0},
		{"mailroom_relay_published_total", []string{"table=mailroom_outbox"}, 50},
		{"mailroom_relay_publish_failures_total", []string{"reason=unroutable"}, 0},
		{"mailroom_relay_dead_lettered_total", nil, 0},
		{"mailroom_relay_confirm_duration_seconds", nil, 50}, // histogram: one confirm per message
		{"mailroom_relay_broker_up", nil, 1},
		{"mailroom_relay_maintenance_leader", nil, 0}, // no --purge-inbox, no --retain: nothing to lead
		{"mailroom_relay_maintenance_purged_rows_total", []string{"table=mailroom_inbox"}, 0},
		{"mailroom_relay_maintenance_purged_rows_total", []string{"table=mailroom_outbox_published"}, 0},
		{"mailroom_relay_maintenance_runs_total", []string{"result=error"}, 0},
		{"mailroom_relay_maintenance_runs_total", []string{"result=skipped"}, 0},
	} {
		if got, ok := m.get(c.name, c.match...); !ok {
			t.Errorf("metric %s%v missing", c.name, c.match)
		} else if got != c.want {
			t.Errorf("metric %s%v = %v, want %v", c.name, c.match, got, c.want)
		}
	}
	for _, name := range []string{
		"mailroom_relay_released_total", "mailroom_relay_batch_duration_seconds", "mailroom_relay_claim_duration_seconds",
		"mailroom_relay_maintenance_duration_seconds", "go_sql_open_connections", "process_cpu_seconds_total", "go_goroutines",
	} {
		if _, ok := m.get(name); !ok {
			t.Errorf("metric %s missing", name)
		}
	}
	if len(m["mailroom_relay_publish_failures_total"]) != 6 {
		t.Errorf("publish failures by reason: %v, want the six reasons", m["mailroom_relay_publish_failures_total"])
	}
	if p, _ := m.get("mailroom_relay_last_progress_timestamp_seconds"); p < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last progress %v is not recent", p)
	}
	if w, ok := m.get("mailroom_relay_confirm_window"); !ok || w != 1024 {
		t.Errorf("confirm window %v (present: %v), want the default 1024 of a lone relay", w, ok)
	}
	if sb, ok := m.get("mailroom_relay_standby"); !ok || sb != 0 {
		t.Errorf("standby %v (present: %v), want 0: a lone relay publishes", sb, ok)
	}

	// The lag gauge follows a due row that cannot be published (its
	// exchange does not exist): it is as old as the row.
	lagID := addMessages(t, s, outbox.Message{Exchange: testenv.Unique("missing"), RoutingKey: "x"})[0]
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET created_at = now() - interval '1 hour', available_at = now() - interval '1 hour' WHERE id = $1`, lagID); err != nil {
		t.Fatal(err)
	}
	if lag := sc.metric("mailroom_outbox_oldest_pending_age_seconds"); lag < 3600 || lag > 7200 {
		t.Errorf("lag gauge %v, want about 3600", lag)
	}
	testenv.Eventually(t, 30*time.Second, "a no_exchange failure to be counted", func() bool {
		return sc.value("mailroom_relay_publish_failures_total", "reason=no_exchange") > 0
	})

	if code := sc.stop(); code != 0 {
		t.Fatalf("exit %d after SIGTERM, want 0", code)
	}
	logs := sc.lines()
	for _, l := range logs {
		if !json.Valid([]byte(l)) {
			t.Errorf("log line is not JSON: %s", l)
		}
		if strings.Contains(l, secret) || strings.Contains(l, ":guest@") {
			t.Errorf("password in a log line: %s", l)
		}
	}
	if last := logs[len(logs)-1]; !strings.Contains(last, `"msg":"relay stopped"`) {
		t.Errorf("last log line %s, want relay stopped", last)
	}
}

// TestReadinessFollowsBrokerConnection closes only this sidecar's broker
// connections: /readyz turns 503 naming the broker, then recovers.
func TestReadinessFollowsBrokerConnection(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	sc := startSidecar(t, s.URL)
	sc.waitReady()
	// The relay dials on its first publish: make it connect.
	receiveIDs(t, b, q, addMessages(t, s, outbox.Message{Exchange: ex, RoutingKey: "a"}), time.Minute)

	// Poll /readyz continuously from before the close, so a short outage
	// is seen however long rabbitmqctl takes to return.
	var notReady atomic.Value // the body of the first 503 that blames the broker
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := http.Get(sc.url("/readyz"))
			if err != nil {
				continue
			}
			body := readAll(resp)
			var r struct{ Checks map[string]string }
			// A 503 for a slow database ping on a loaded machine is not
			// the one this test waits for.
			if resp.StatusCode == http.StatusServiceUnavailable && json.Unmarshal([]byte(body), &r) == nil && r.Checks["broker"] != "ok" && notReady.Load() == nil {
				notReady.Store(body)
			}
			time.Sleep(5 * time.Millisecond) // polling pace, not synchronisation
		}
	}()
	closed := testenv.CloseConnection(t, "mailroom-relay "+sc.name)
	if closed < 2 {
		t.Fatalf("closed %d connections named %q, want the relay's and the readiness watch's", closed, "mailroom-relay "+sc.name)
	}
	testenv.Eventually(t, 30*time.Second, "/readyz to report 503", func() bool { return notReady.Load() != nil })
	close(stop)
	wg.Wait()
	body := notReady.Load().(string)
	var r struct {
		Ready  bool
		Checks map[string]string
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil || r.Ready || r.Checks["broker"] == "ok" {
		t.Fatalf("503 body %s, want the broker check failing", body)
	}
	t.Logf("not ready: %s", strings.TrimSpace(body))
	sc.waitReady()
	// And it publishes again.
	receiveIDs(t, b, q, addMessages(t, s, outbox.Message{Exchange: ex, RoutingKey: "b"}), time.Minute)
}

func readAll(resp *http.Response) string {
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			return b.String()
		}
	}
}

// TestSIGTERMUnderLoadLosesNothing stops a sidecar while a writer keeps
// adding messages: it exits 0 and leaves no row leased, and a second sidecar
// delivers the rest, so every message reaches the queue.
func TestSIGTERMUnderLoadLosesNothing(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)

	var mu sync.Mutex
	var ids []string
	stopWriter := make(chan struct{})
	writerDone := make(chan struct{})
	go func() { // the load: batches of 20 until told to stop
		defer close(writerDone)
		for i := 0; ; i++ {
			select {
			case <-stopWriter:
				return
			default:
			}
			msgs := make([]outbox.Message, 20)
			for j := range msgs {
				msgs[j] = outbox.Message{Exchange: ex, RoutingKey: "load", Key: fmt.Sprint("k", (i*20+j)%50)}
			}
			got := addMessages(t, s, msgs...)
			mu.Lock()
			ids = append(ids, got...)
			mu.Unlock()
		}
	}()
	defer func() {
		select {
		case <-stopWriter:
		default:
			close(stopWriter)
		}
		<-writerDone
	}()

	first := startSidecar(t, s.URL, "--batch-size", "50")
	testenv.Eventually(t, time.Minute, "the first sidecar to publish 500", func() bool {
		return first.value("mailroom_relay_published_total") >= 500
	})
	if code := first.stop(); code != 0 {
		t.Fatalf("exit %d after SIGTERM, want 0", code)
	}
	close(stopWriter)
	<-writerDone
	var pending, leased int
	if err := s.DB.Get(&pending, `SELECT count(*) FROM mailroom_outbox`); err != nil {
		t.Fatal(err)
	}
	if err := s.DB.Get(&leased, `SELECT count(*) FROM mailroom_outbox WHERE leased_until > now()`); err != nil {
		t.Fatal(err)
	}
	if leased != 0 {
		t.Fatalf("%d rows still leased after a clean stop", leased)
	}
	mu.Lock()
	all := append([]string(nil), ids...)
	mu.Unlock()
	t.Logf("stopped with %d of %d rows pending, none leased", pending, len(all))

	second := startSidecar(t, s.URL)
	deliveries := receiveIDs(t, b, q, all, 2*time.Minute)
	testenv.Eventually(t, time.Minute, "the outbox to drain", func() bool {
		var left int
		return s.DB.Get(&left, `SELECT count(*) FROM mailroom_outbox`) == nil && left == 0
	})
	t.Logf("%d deliveries for %d messages", deliveries, len(all))
	if code := second.stop(); code != 0 {
		t.Fatalf("second sidecar exit %d", code)
	}
}

// TestDeadReplayIsPublished: a row dead-lettered by the relay (unroutable,
// one attempt) is replayed by the CLI and published.
func TestDeadReplayIsPublished(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange() // no queue bound yet: unroutable
	sc := startSidecar(t, s.URL, "--max-attempts", "1")
	id := addMessages(t, s, outbox.Message{Exchange: ex, RoutingKey: "order.placed", Key: "order-7"})[0]
	// The counter is bumped just after the commit that makes the row
	// visible: wait for both.
	testenv.Eventually(t, time.Minute, "the row to be dead-lettered and counted", func() bool {
		return sc.value("mailroom_outbox_dead_rows") == 1 && sc.value("mailroom_relay_dead_lettered_total") >= 1
	})
	if got := sc.metric("mailroom_relay_dead_lettered_total"); got != 1 {
		t.Fatalf("dead_lettered_total %v, want 1", got)
	}
	env := cleanEnv("DATABASE_URL=" + s.URL)
	r := runBin(t, env, "dead", "list", "--json")
	var dead []struct {
		ID        string `json:"id"`
		LastError string `json:"last_error"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &dead); err != nil || len(dead) != 1 || dead[0].ID != id || !strings.Contains(dead[0].LastError, "unroutable") {
		t.Fatalf("dead list --json: %s %v", r.stdout, err)
	}

	q := b.Queue(ex, "order.*", nil)
	if r := runBin(t, env, "dead", "replay", id); r.code != 0 {
		t.Fatalf("dead replay: exit %d: %s", r.code, r.stderr)
	}
	receiveIDs(t, b, q, []string{id}, time.Minute)
	testenv.Eventually(t, 30*time.Second, "outbox and dead letters empty", func() bool {
		m := sc.metrics()
		pending, ok1 := m.get("mailroom_outbox_pending_rows")
		dead, ok2 := m.get("mailroom_outbox_dead_rows")
		return ok1 && ok2 && pending == 0 && dead == 0
	})
}

// TestStatusPageAdminActions: the page lists dead letters; replay and
// discard need the token (form field or bearer), refuse cross-origin posts,
// and are disabled without --admin-token.
func TestStatusPageAdminActions(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	ids := addMessages(t, s,
		outbox.Message{Exchange: ex, RoutingKey: "a"},
		outbox.Message{Exchange: ex, RoutingKey: "b"},
		outbox.Message{Exchange: ex, RoutingKey: "c"},
	)
	// Dead before any sidecar runs; replayed, they are published.
	bury(t, s, `NOT_FOUND - no exchange "nowhere" <script>`, ids...)

	plain := startSidecar(t, s.URL, "--maintenance-interval", "0")
	_, page := plain.get("/")
	if !strings.Contains(page, ids[0]) || !strings.Contains(page, `id="admin-off"`) || !strings.Contains(page, `<button type="submit" id="replay" disabled>`) {
		t.Fatalf("page without a token should list the dead letter with disabled buttons:\n%s", page)
	}
	if strings.Contains(page, "<script>") || !strings.Contains(page, "&lt;script&gt;") {
		t.Fatalf("the last error is not HTML-escaped")
	}
	if code, body := post(t, plain, "/dead/replay", url.Values{"id": {ids[0]}, "token": {"anything-anything"}}, nil); code != http.StatusForbidden || !strings.Contains(body, "--admin-token") {
		t.Fatalf("POST without --admin-token: %d %s", code, body)
	}

	token := "t0ken-" + testenv.Unique("admin")
	admin := startSidecar(t, s.URL, "--maintenance-interval", "0", "--admin-token", token)
	_, page = admin.get("/")
	if !strings.Contains(page, `<button type="submit" id="replay" formaction="/dead/replay">`) || strings.Contains(page, token) {
		t.Fatalf("page with a token should enable the buttons and never show the token:\n%s", page)
	}
	for _, c := range []struct {
		what  string
		form  url.Values
		hdr   map[string]string
		wantC int
	}{
		{"no token", url.Values{"id": {ids[0]}}, nil, http.StatusForbidden},
		{"wrong token", url.Values{"id": {ids[0]}, "token": {token + "x"}}, nil, http.StatusForbidden},
		{"cross-origin", url.Values{"id": {ids[0]}, "token": {token}}, map[string]string{"Origin": "http://evil.example"}, http.StatusForbidden},
		{"cross-site fetch", url.Values{"id": {ids[0]}, "token": {token}}, map[string]string{"Sec-Fetch-Site": "cross-site"}, http.StatusForbidden},
	} {
		if code, body := post(t, admin, "/dead/replay", c.form, c.hdr); code != c.wantC {
			t.Errorf("%s: %d %s, want %d", c.what, code, body, c.wantC)
		}
	}
	var dead int
	if err := s.DB.Get(&dead, `SELECT count(*) FROM mailroom_outbox_dead`); err != nil || dead != 3 {
		t.Fatalf("refused posts changed the dead letters: %d, %v", dead, err)
	}

	// Browser form: token field, redirect back with the outcome.
	code, body := post(t, admin, "/dead/replay", url.Values{"id": {ids[0]}, "token": {token}}, map[string]string{"Origin": "http://" + admin.addr})
	if code != http.StatusSeeOther || !strings.Contains(body, "replayed 1 dead letter") {
		t.Fatalf("replay by form: %d %q", code, body)
	}
	receiveIDs(t, b, q, ids[:1], time.Minute)
	// Script: bearer token, JSON answers.
	jsonHdr := map[string]string{"Authorization": "Bearer " + token, "Accept": "application/json"}
	if code, body := post(t, admin, "/dead/discard", url.Values{"id": {ids[1]}}, jsonHdr); code != http.StatusOK || strings.TrimSpace(body) != `{"discarded":1}` {
		t.Fatalf("discard by bearer: %d %s", code, body)
	}
	if code, body := post(t, admin, "/dead/discard", url.Values{"id": {ids[1]}}, jsonHdr); code != http.StatusNotFound || !strings.Contains(body, ids[1]) {
		t.Fatalf("discard again: %d %s, want 404 naming the id", code, body)
	}
	if code, body := post(t, admin, "/dead/replay", url.Values{"id": {"junk"}}, jsonHdr); code != http.StatusBadRequest {
		t.Fatalf("replay junk id: %d %s, want 400", code, body)
	}
	if code, body := post(t, admin, "/dead/replay", url.Values{}, jsonHdr); code != http.StatusBadRequest {
		t.Fatalf("replay nothing: %d %s, want 400", code, body)
	}
	if code, body := post(t, admin, "/dead/replay", url.Values{"all": {"true"}}, jsonHdr); code != http.StatusOK || strings.TrimSpace(body) != `{"replayed":1}` {
		t.Fatalf("replay all: %d %s", code, body)
	}
	receiveIDs(t, b, q, ids[2:], time.Minute)
	_, page = admin.get("/")
	if !strings.Contains(page, `id="no-dead"`) || !strings.Contains(page, `<div class="n" id="dead">0</div>`) {
		t.Fatalf("page after replay and discard should show no dead letters:\n%s", page)
	}
	// This test's two sidecars run on one outbox: one publishes, one stands by.
	testenv.Eventually(t, 10*time.Second, "the page to show two relays running, one publishing", func() bool {
		_, page = admin.get("/")
		return strings.Contains(page, `<span id="relays">2</span> · <span id="publishing">1</span>`)
	})
}

// post sends a form without following redirects; for a redirect it returns
// the decoded Location query as the body.
func post(t *testing.T, sc *sidecar, path string, form url.Values, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, sc.url(path), strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	if resp.StatusCode == http.StatusSeeOther {
		resp.Body.Close()
		loc, _ := url.Parse(resp.Header.Get("Location"))
		return resp.StatusCode, loc.Query().Get("done") + loc.Query().Get("error")
	}
	return resp.StatusCode, readAll(resp)
}

// TestMaintenanceRunsOnOneInstance: of two sidecars on one schema only one
// holds the maintenance lock and purges; when it stops, the other takes
// over.
func TestMaintenanceRunsOnOneInstance(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	seed := func(published, inbox int) {
		t.Helper()
		if _, err := s.DB.Exec(`INSERT INTO mailroom_outbox_published (seq, id, exchange, routing_key, payload, created_at, attempts, published_at)
SELECT g, gen_random_uuid(), 'x', 'r', '\x7b7d', now() - interval '3 hours', 0, now() - interval '2 hours'
FROM generate_series((SELECT coalesce(max(seq), 0) + 1 FROM mailroom_outbox_published), (SELECT coalesce(max(seq), 0) FROM mailroom_outbox_published) + $1) g`, published); err != nil {
			t.Fatal(err)
		}
		if _, err := s.DB.Exec(`INSERT INTO mailroom_inbox (scope, id, recorded_at)
SELECT 'payments', gen_random_uuid()::text, now() - interval '2 hours' FROM generate_series(1, $1)`, inbox); err != nil {
			t.Fatal(err)
		}
		// Fresh entries stay.
		if _, err := s.DB.Exec(`INSERT INTO mailroom_inbox (scope, id) SELECT 'payments', gen_random_uuid()::text FROM generate_series(1, 5)`); err != nil {
			t.Fatal(err)
		}
	}
	seed(2500, 1500)
	flags := []string{"--maintenance-interval", "100ms", "--retain", "1h", "--purge-inbox", "payments=1h", "--purge-batch", "500"}
	a := startSidecar(t, s.URL, flags...)
	b := startSidecar(t, s.URL, flags...)
	purged := func(sc *sidecar) float64 {
		return sc.value("mailroom_relay_maintenance_purged_rows_total")
	}
	testenv.Eventually(t, time.Minute, "both to have tried maintenance, and the old rows to be purged", func() bool {
		ma, mb := a.metrics(), b.metrics()
		tried := func(m scrape) bool {
			ok, _ := m.get("mailroom_relay_maintenance_runs_total", "result=ok")
			skipped, _ := m.get("mailroom_relay_maintenance_runs_total", "result=skipped")
			return ok+skipped > 0
		}
		return tried(ma) && tried(mb) && purged(a)+purged(b) == 4000
	})
	leader, follower := a, b
	if b.metric("mailroom_relay_maintenance_leader") == 1 {
		leader, follower = b, a
	}
	lm, fm := leader.metrics(), follower.metrics()
	val := func(m scrape, name string, match ...string) float64 {
		v, ok := m.get(name, match...)
		if !ok {
			t.Fatalf("metric %s%v missing", name, match)
		}
		return v
	}
	if val(lm, "mailroom_relay_maintenance_leader") != 1 || val(fm, "mailroom_relay_maintenance_leader") != 0 {
		t.Fatalf("leader gauges %v and %v, want exactly one 1", val(lm, "mailroom_relay_maintenance_leader"), val(fm, "mailroom_relay_maintenance_leader"))
	}
	if val(fm, "mailroom_relay_maintenance_runs_total", "result=ok") != 0 || val(fm, "mailroom_relay_maintenance_purged_rows_total") != 0 ||
		val(fm, "mailroom_relay_maintenance_runs_total", "result=skipped") == 0 {
		t.Fatalf("the follower ran maintenance: %v", fm)
	}
	if pub, inbox := val(lm, "mailroom_relay_maintenance_purged_rows_total", "table=mailroom_outbox_published"),
		val(lm, "mailroom_relay_maintenance_purged_rows_total", "table=mailroom_inbox"); pub != 2500 || inbox != 1500 {
		t.Fatalf("leader purged published %v, inbox %v; want 2500 and 1500", pub, inbox)
	}
	var fresh int
	if err := s.DB.Get(&fresh, `SELECT count(*) FROM mailroom_inbox`); err != nil || fresh != 5 {
		t.Fatalf("inbox rows left %d, %v; want the 5 fresh ones", fresh, err)
	}

	// The leader stops (and unlocks); the follower takes over.
	if code := leader.stop(); code != 0 {
		t.Fatalf("leader exit %d", code)
	}
	seed(100, 100)
	testenv.Eventually(t, time.Minute, "the follower to take over and purge", func() bool {
		return follower.value("mailroom_relay_maintenance_leader") == 1 && purged(follower) == 200
	})
}

// A service with its own inbox table names (and no --inbox-table) has no
// mailroom_inbox: maintenance says so once and keeps running, instead of
// failing every run.
func TestMaintenanceWithoutInboxTable(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	sc := startSidecar(t, s.URL, "--maintenance-interval", "50ms", "--inbox-table", "no_such_inbox", "--purge-inbox", "payments=1h")
	testenv.Eventually(t, time.Minute, "several maintenance runs", func() bool {
		v, _ := sc.metrics().get("mailroom_relay_maintenance_runs_total", "result=ok")
		return v >= 3
	})
	said, failed := 0, 0
	for _, l := range sc.lines() {
		if strings.Contains(l, "inbox table not found") {
			said++
		}
		if strings.Contains(l, "maintenance failed") {
			failed++
		}
	}
	if said != 1 || failed != 0 {
		t.Fatalf("missing inbox table logged %d times (want once), maintenance failed %d times (want 0)", said, failed)
	}
}

// Instances that run different purges do not keep each other from them: a
// leader without --retain (purging an inbox consumer) does not stop an
// instance with --retain from purging the published table (a rolling change
// of the flags).
func TestMaintenanceLeadersPerPurgeSet(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	if _, err := s.DB.Exec(`INSERT INTO mailroom_outbox_published (seq, id, exchange, routing_key, payload, created_at, attempts, published_at)
SELECT g, gen_random_uuid(), 'x', 'r', '\x7b7d', now() - interval '3 hours', 0, now() - interval '2 hours' FROM generate_series(1, 10) g`); err != nil {
		t.Fatal(err)
	}
	a := startSidecar(t, s.URL, "--maintenance-interval", "100ms", "--purge-inbox", "payments=1h")
	testenv.Eventually(t, time.Minute, "the instance without --retain to lead", func() bool {
		return a.metric("mailroom_relay_maintenance_leader") == 1
	})
	startSidecar(t, s.URL, "--maintenance-interval", "100ms", "--retain", "1h")
	testenv.Eventually(t, time.Minute, "the published rows purged by the instance with --retain", func() bool {
		var n int
		return s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox_published`) == nil && n == 0
	})
}

// healthcheck exits 0 against a ready relay and 1, saying why, against an
// address nothing listens on: what the image's HEALTHCHECK runs.
func TestHealthcheck(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	sc := startSidecar(t, s.URL)
	sc.waitReady()
	if r := runBin(t, cleanEnv(), "healthcheck", "--http", sc.addr); r.code != 0 || !strings.HasPrefix(r.stdout, "ready") {
		t.Fatalf("healthcheck of a ready relay: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if r := runBin(t, cleanEnv("MAILROOM_HTTP="+sc.addr), "healthcheck"); r.code != 0 {
		t.Fatalf("healthcheck with MAILROOM_HTTP: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := runBin(t, cleanEnv(), "healthcheck", "--http", "127.0.0.1:1", "--timeout", "2s"); r.code != 1 || !strings.Contains(r.stderr, "not ready") || !strings.Contains(r.stderr, "MAILROOM_HTTP") {
		t.Fatalf("healthcheck of nothing: exit %d, stderr %q; want 1 and why", r.code, r.stderr)
	}
	if r := runBin(t, cleanEnv(), "healthcheck", "--timeout", "0s"); r.code != 2 {
		t.Fatalf("healthcheck --timeout 0s: exit %d, want 2", r.code)
	}
}

// With the standard OpenTelemetry environment set (here the console
// exporter) the sidecar exports each publish as a producer span, a child
// of the trace outbox.Add stored with the message, with the messaging
// attributes and no status on success; without it, it exports nothing.
func TestSidecarExportsPublishSpans(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)

	traceID, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	spanID, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	ctx := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled}))
	ob, err := outbox.New(outbox.Config{Propagator: propagation.TraceContext{}})
	if err != nil {
		t.Fatal(err)
	}
	id := outbox.NewID()
	if err := ob.Add(ctx, s.DB, outbox.Message{ID: id, Exchange: ex, RoutingKey: "order.placed", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}

	sc := startSidecarEnv(t, []string{"OTEL_TRACES_EXPORTER=console", "OTEL_SERVICE_NAME=relay-under-test"}, s.URL)
	receiveIDs(t, b, q, []string{id}, time.Minute)
	if code := sc.stop(); code != 0 { // flushes the batched spans
		t.Fatalf("exit %d", code)
	}
	var found bool
	dec := json.NewDecoder(strings.NewReader(sc.output()))
	for dec.More() {
		var span struct {
			Name        string
			SpanContext struct{ TraceID string }
			Parent      struct{ SpanID string }
			SpanKind    int
			Status      struct{ Code string }
			Attributes  []struct {
				Key   string
				Value struct{ Value any }
			}
			Resource []struct {
				Key   string
				Value struct{ Value any }
			}
		}
		if err := dec.Decode(&span); err != nil {
			t.Fatalf("stdout is not the console exporter's JSON: %v\n%s", err, sc.output())
		}
		if span.Name != "publish "+ex {
			continue
		}
		found = true
		attrs := map[string]any{}
		for _, a := range span.Attributes {
			attrs[a.Key] = a.Value.Value
		}
		if span.SpanContext.TraceID != traceID.String() || span.Parent.SpanID != spanID.String() {
			t.Errorf("publish span in trace %s under %s, want the writer's %s under %s", span.SpanContext.TraceID, span.Parent.SpanID, traceID, spanID)
		}
		if span.SpanKind != int(trace.SpanKindProducer) || span.Status.Code != "Unset" {
			t.Errorf("span kind %d, status %q; want producer and an unset status on success", span.SpanKind, span.Status.Code)
		}
		for k, want := range map[string]any{"messaging.system": "rabbitmq", "messaging.message.id": id, "messaging.destination.name": ex, "server.address": "127.0.0.1"} {
			if attrs[k] != want {
				t.Errorf("attribute %s = %v, want %v (all: %v)", k, attrs[k], want, attrs)
			}
		}
		if _, ok := attrs["server.port"]; !ok {
			t.Errorf("no server.port attribute: %v", attrs)
		}
		var service any
		for _, r := range span.Resource {
			if r.Key == "service.name" {
				service = r.Value.Value
			}
		}
		if service != "relay-under-test" {
			t.Errorf("service.name %v, want OTEL_SERVICE_NAME's", service)
		}
	}
	if !found {
		t.Fatalf("no span %q on stdout:\n%s", "publish "+ex, sc.output())
	}

	// Without the environment: no spans, nothing on stdout.
	plain := startSidecar(t, s.URL)
	id2 := addMessages(t, s, outbox.Message{Exchange: ex, RoutingKey: "order.placed"})
	receiveIDs(t, b, q, id2, time.Minute)
	if code := plain.stop(); code != 0 || plain.output() != "" {
		t.Fatalf("without OTEL_*: exit %d, stdout %q; want nothing exported", code, plain.output())
	}
}

// A wrong broker URL is said in the log at start, not only on /readyz.
func TestWrongBrokerIsLoggedAtStart(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	sc := startSidecar(t, s.URL, "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
	testenv.Eventually(t, 30*time.Second, "a log line saying the broker cannot be reached", func() bool {
		for _, l := range sc.lines() {
			if strings.Contains(l, "cannot connect to the broker") && strings.Contains(l, "AMQP_URL") && strings.Contains(l, "127.0.0.1:1") {
				return true
			}
		}
		return false
	})
	if code, _ := sc.get("/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz %d with the broker out of reach, want 503", code)
	}
}

// The status page filters dead letters (exchange, type, error text) and
// replays all that match the filter, and only those.
func TestStatusPageDeadLetterFilter(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	ids := addMessages(t, s,
		outbox.Message{Exchange: "orders-" + s.Name, RoutingKey: "a", Type: "order.placed"},
		outbox.Message{Exchange: "billing-" + s.Name, RoutingKey: "b", Type: "invoice.sent"},
	)
	bury(t, s, "relay: exchange does not exist", ids[0])
	bury(t, s, "relay: nacked by the broker", ids[1])
	const token = "a-token-of-sixteen-chars"
	sc := startSidecar(t, s.URL, "--maintenance-interval", "0", "--admin-token", token)

	_, page := sc.get("/?exchange=billing-" + s.Name)
	if !strings.Contains(page, ids[1]) || strings.Contains(page, ids[0]) || !strings.Contains(page, `id="filtered"`) {
		t.Fatalf("page filtered by exchange lists the wrong rows:\n%s", page)
	}
	if _, page := sc.get("/?error=nacked&type=order.placed"); !strings.Contains(page, `id="no-dead"`) || strings.Contains(page, ids[0]) || strings.Contains(page, ids[1]) {
		t.Fatalf("page with a filter nothing matches:\n%s", page)
	}
	jsonHdr := map[string]string{"Authorization": "Bearer " + token, "Accept": "application/json"}
	code, body := post(t, sc, "/dead/replay", url.Values{"all": {"true"}, "exchange": {"orders-" + s.Name}}, jsonHdr)
	if code != http.StatusOK || strings.TrimSpace(body) != `{"replayed":1}` {
		t.Fatalf("replay all matching: %d %s", code, body)
	}
	var left []string
	if err := s.DB.Select(&left, `SELECT id::text FROM mailroom_outbox_dead`); err != nil || len(left) != 1 || left[0] != ids[1] {
		t.Fatalf("left dead %v (%v), want only %s", left, err, ids[1])
	}
}

// --amqp-url repeated names the nodes of a cluster: the sidecar connects
// to one that answers, whichever it tries first, and publishes.
func TestSidecarNodesOfACluster(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "amqp://guest:guest@" + ln.Addr().String() + "/"
	ln.Close() // nothing answers there now
	sc := startSidecar(t, s.URL, "--amqp-url", dead, "--amqp-url", testenv.AMQPURL())
	sc.waitReady()
	var msgs []outbox.Message
	for i := range 20 {
		msgs = append(msgs, outbox.Message{Exchange: ex, RoutingKey: "order.placed", Key: fmt.Sprint("k", i%3)})
	}
	receiveIDs(t, b, q, addMessages(t, s, msgs...), time.Minute)
	for _, l := range sc.lines() {
		if strings.Contains(l, "relay starting") && !strings.Contains(l, ln.Addr().String()) {
			t.Errorf("the start line does not name both nodes: %s", l)
		}
	}
}

// A sidecar run with --no-listen (behind PgBouncer) holds no session lock,
// yet `status` counts it, apart as polling, beside one that listens; once
// it stops it is no longer counted.
func TestStatusCountsNoListenSidecars(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	testenv.NewBroker(t)
	polling := startSidecar(t, s.URL, "--no-listen")
	polling.waitReady()
	startSidecar(t, s.URL).waitReady()
	status := func() (st struct{ Relays, Polling, Publishing int64 }) {
		t.Helper()
		r := runBin(t, cleanEnv("DATABASE_URL="+s.URL), "status", "--json")
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil {
			t.Fatalf("status --json: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
		}
		return st
	}
	testenv.Eventually(t, 30*time.Second, "status counting 2 relays, 1 polling", func() bool {
		st := status()
		return st.Relays == 2 && st.Polling == 1
	})
	if err := polling.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-polling.done
	if st := status(); st.Relays != 1 || st.Polling != 0 {
		t.Fatalf("after the --no-listen sidecar stopped: %+v; want 1 relay, none polling", st)
	}
}
