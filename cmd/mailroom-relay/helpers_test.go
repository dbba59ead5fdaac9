package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// bin is the mailroom-relay binary under test, built once for the package
// (testenv.BuildBinary builds into one test's TempDir, which would vanish
// while other tests still run it).
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mailroom-relay-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "mailroom-relay")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build mailroom-relay: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// cleanEnv is the test process's environment without the variables the
// binary reads, plus extra.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "DATABASE_URL" || k == "AMQP_URL" || strings.HasPrefix(k, "MAILROOM_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

type result struct {
	code           int
	stdout, stderr string
}

// runBin runs one command to completion.
func runBin(t *testing.T, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return r
}

// withPassword puts a password into a lib/pq URL. The local server trusts
// every connection, so the URL still works and the tests can check the
// password never shows.
func withPassword(t *testing.T, dbURL, pw string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), pw)
	return u.String()
}

// sidecar is a running `mailroom-relay run`.
type sidecar struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	addr string

	mu     sync.Mutex
	logs   []string
	stdout bytes.Buffer  // under mu
	done   chan struct{} // closed when the process has exited
	code   int
	ready  chan string // the "http listening" address
}

// startSidecar runs `mailroom-relay run` against dbURL (a schema's URL) on
// a free port, with fast polling; extra flags are appended.
func startSidecar(t *testing.T, dbURL string, extra ...string) *sidecar {
	t.Helper()
	return startSidecarEnv(t, nil, dbURL, extra...)
}

// startSidecarEnv is startSidecar with env ("KEY=value") added to the
// sidecar's environment.
func startSidecarEnv(t *testing.T, env []string, dbURL string, extra ...string) *sidecar {
	t.Helper()
	s := &sidecar{t: t, name: testenv.Unique("mr"), done: make(chan struct{}), ready: make(chan string, 1)}
	args := append([]string{"run", "--http", "127.0.0.1:0", "--name", s.name,
		"--poll-interval", "50ms", "--min-backoff", "10ms", "--max-backoff", "50ms",
		"--sample-interval", "100ms", "--log-level", "debug"}, extra...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Env = cleanEnv(append([]string{"DATABASE_URL=" + dbURL, "AMQP_URL=" + testenv.AMQPURL()}, env...)...)
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdout = lockedWriter{&s.mu, &s.stdout}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			s.logs = append(s.logs, line)
			s.mu.Unlock()
			var l struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "http listening" {
				s.ready <- l.Addr
			}
		}
		err := s.cmd.Wait()
		s.code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			s.code = ee.ExitCode()
		}
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			_ = s.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-s.done:
			case <-time.After(time.Minute):
				_ = s.cmd.Process.Kill()
				<-s.done
			}
		}
		if t.Failed() {
			t.Logf("sidecar %s logs:\n%s", s.name, strings.Join(s.lines(), "\n"))
		}
	})
	select {
	case s.addr = <-s.ready:
	case <-s.done:
		t.Fatalf("sidecar exited with %d before listening:\n%s", s.code, strings.Join(s.lines(), "\n"))
	case <-time.After(time.Minute):
		t.Fatalf("sidecar did not log \"http listening\" within a minute:\n%s", strings.Join(s.lines(), "\n"))
	}
	return s
}

// lockedWriter writes to w under mu.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// output is what the sidecar wrote to stdout so far.
func (s *sidecar) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stdout.String()
}

func (s *sidecar) lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.logs...)
}

// stop sends SIGTERM and returns the exit status.
func (s *sidecar) stop() int {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		s.t.Fatal(err)
	}
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		s.t.Fatal("sidecar did not stop within a minute of SIGTERM")
	}
	return s.code
}

func (s *sidecar) url(path string) string { return "http://" + s.addr + path }

// get returns the status code and body.
func (s *sidecar) get(path string) (int, string) {
	s.t.Helper()
	resp, err := http.Get(s.url(path))
	if err != nil {
		s.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func (s *sidecar) waitReady() {
	s.t.Helper()
	testenv.Eventually(s.t, 30*time.Second, "sidecar "+s.name+" ready", func() bool {
		code, _ := s.get("/readyz")
		return code == http.StatusOK
	})
}

// series is one sample of a scrape.
type series struct {
	labels map[string]string
	value  float64 // a histogram's sample count
}

// scrape is /metrics parsed with the Prometheus text parser: series by
// metric name.
type scrape map[string][]series

// metrics scrapes /metrics.
func (s *sidecar) metrics() scrape {
	s.t.Helper()
	resp, err := http.Get(s.url("/metrics"))
	if err != nil {
		s.t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.t.Fatalf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		s.t.Fatalf("parse /metrics: %v", err)
	}
	out := scrape{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			se := series{labels: map[string]string{}}
			for _, l := range m.GetLabel() {
				se.labels[l.GetName()] = l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				se.value = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				se.value = m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				se.value = float64(m.GetHistogram().GetSampleCount())
			case m.GetUntyped() != nil:
				se.value = m.GetUntyped().GetValue()
			}
			out[name] = append(out[name], se)
		}
	}
	return out
}

// get sums the series of name whose labels include every "k=v" of match;
// ok is false when there is none.
func (sc scrape) get(name string, match ...string) (v float64, ok bool) {
next:
	for _, se := range sc[name] {
		for _, kv := range match {
			k, want, _ := strings.Cut(kv, "=")
			if se.labels[k] != want {
				continue next
			}
		}
		v, ok = v+se.value, true
	}
	return v, ok
}

// metric scrapes and returns get(name, match...); the test fails if it is
// missing.
func (s *sidecar) metric(name string, match ...string) float64 {
	s.t.Helper()
	v, ok := s.metrics().get(name, match...)
	if !ok {
		s.t.Fatalf("metric %s%v missing from /metrics", name, match)
	}
	return v
}

// value is metric for waiting conditions: 0 while the metric is not
// exposed yet (the relay registers its instruments when Run starts, which
// can be after the first scrape).
func (s *sidecar) value(name string, match ...string) float64 {
	v, _ := s.metrics().get(name, match...)
	return v
}

// addMessages writes msgs through outbox.Add and returns their ids.
func addMessages(t *testing.T, s *testenv.Schema, msgs ...outbox.Message) []string {
	t.Helper()
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(msgs))
	for i := range msgs {
		if msgs[i].ID == "" {
			msgs[i].ID = outbox.NewID()
		}
		if msgs[i].Payload == nil {
			msgs[i].Payload = []byte(`{"n":1}`)
		}
		ids[i] = msgs[i].ID
	}
	for len(msgs) > 0 { // Add takes at most a few thousand per call comfortably
		n := min(len(msgs), 1000)
		if err := ob.Add(context.Background(), s.DB, msgs[:n]...); err != nil {
			t.Fatal(err)
		}
		msgs = msgs[n:]
	}
	return ids
}

// bury moves outbox rows to the dead-letter table as the relay does after
// the last attempt.
func bury(t *testing.T, s *testenv.Schema, reason string, ids ...string) {
	t.Helper()
	_, err := s.DB.Exec(`WITH d AS (DELETE FROM mailroom_outbox WHERE id = ANY($1::uuid[])
  RETURNING seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at)
INSERT INTO mailroom_outbox_dead (seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at, attempts, last_error)
SELECT seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at, 3, $2 FROM d`, "{"+strings.Join(ids, ",")+"}", reason)
	if err != nil {
		t.Fatal(err)
	}
}

// receiveIDs consumes queue until every id in want arrived (duplicates are
// allowed: delivery is at least once) and returns how many deliveries there
// were.
func receiveIDs(t *testing.T, b *testenv.Broker, queue string, want []string, timeout time.Duration) int {
	t.Helper()
	ch := b.Channel()
	if err := ch.Qos(500, 0, false); err != nil {
		t.Fatal(err)
	}
	tag := testenv.Unique("c")
	ds, err := ch.Consume(queue, tag, true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Cancel(tag, false) //nolint:errcheck
	missing := map[string]bool{}
	for _, id := range want {
		missing[id] = true
	}
	n := 0
	deadline := time.After(timeout)
	for len(missing) > 0 {
		select {
		case d := <-ds:
			n++
			delete(missing, d.MessageId)
		case <-deadline:
			t.Fatalf("%d of %d messages never reached queue %s", len(missing), len(want), queue)
		}
	}
	return n
}
