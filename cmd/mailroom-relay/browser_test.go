//go:build browser

// The status page in a real browser: go test -tags browser ./cmd/mailroom-relay/
// Needs the Debian chromium package (apt-get install -y chromium). Kept out
// of `make test` so CI stays fast; without chromium the test skips, or
// fails under CI=true.

package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	msg := "chromium is not installed: apt-get update && apt-get install -y chromium"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

func headless(t *testing.T, browser string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(), "--window-size=1200,900"}
	cmd := exec.CommandContext(ctx, browser, append(base, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, stderr.String())
	}
	return string(out)
}

func TestStatusPageInChromium(t *testing.T) {
	t.Parallel()
	browser := chromium(t)
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	var later []outbox.Message
	for range 7 {
		later = append(later, outbox.Message{Exchange: ex, RoutingKey: "later", AvailableAt: time.Now().Add(time.Hour)})
	}
	addMessages(t, s, later...)
	deadIDs := addMessages(t, s,
		outbox.Message{Exchange: "gone", RoutingKey: "order.placed", Key: "order-1"},
		outbox.Message{Exchange: "gone", RoutingKey: "order.paid", Key: "order-1"},
	)
	bury(t, s, `relay: exchange does not exist: "gone"`, deadIDs...)

	sc := startSidecar(t, s.URL, "--admin-token", "t0ken-"+testenv.Unique("browser"))
	sc.waitReady()
	var now []outbox.Message
	for range 40 {
		now = append(now, outbox.Message{Exchange: ex, RoutingKey: "now"})
	}
	receiveIDs(t, b, q, addMessages(t, s, now...), time.Minute)
	// Wait until the chart has points after the publishes.
	testenv.Eventually(t, 30*time.Second, "the chart to have samples", func() bool {
		_, page := sc.get("/")
		return strings.Contains(page, `points="0.0,`) && strings.Contains(page, `>40</div>`)
	})

	dom := headless(t, browser, "--dump-dom", sc.url("/"))
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`id="pending">7<`),
		regexp.MustCompile(`id="scheduled">7<`),
		regexp.MustCompile(`id="dead">2<`),
		regexp.MustCompile(`id="published">40<`),
		regexp.MustCompile(`id="publishing">1<`),
		regexp.MustCompile(`id="ready">ready<`),
		regexp.MustCompile(`<svg id="chart-throughput"[^>]*>\s*<polyline [^>]*points="[0-9., ]+"`),
		regexp.MustCompile(`<svg id="chart-lag"`),
		regexp.MustCompile(regexp.QuoteMeta(deadIDs[0])),
		regexp.MustCompile(regexp.QuoteMeta(deadIDs[1])),
		regexp.MustCompile(`exchange does not exist: (&quot;|")gone`),
		regexp.MustCompile(`<button type="submit" id="replay" formaction="/dead/replay">`),
	} {
		if !want.MatchString(dom) {
			t.Errorf("rendered DOM lacks %s", want)
		}
	}
	if t.Failed() {
		t.Logf("DOM:\n%s", dom)
	}

	// Kept after the test on purpose: look at it.
	shot := filepath.Join(os.TempDir(), testenv.Unique("mailroom-relay-status")+".png")
	headless(t, browser, "--screenshot="+shot, sc.url("/"))
	fi, err := os.Stat(shot)
	if err != nil || fi.Size() == 0 {
		t.Fatalf("screenshot %s: %v", shot, err)
	}
	t.Logf("screenshot of the status page: %s (%d bytes)", shot, fi.Size())
}
