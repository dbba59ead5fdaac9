//go:build brokerfaults

package brokerfaults

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// setRabbitEnv sets the broker's rabbit application variable key to value
// (an Erlang term) until the test ends: its cleanup restores the value it
// had, or its absence, even when the test fails.
func setRabbitEnv(t *testing.T, key, value string) {
	t.Helper()
	out, err := testenv.Ctl("-q", "eval", "application:get_env(rabbit, "+key+").")
	if err != nil {
		t.Fatalf("read %s: %v", key, err)
	}
	restore := "application:unset_env(rabbit, " + key + ")."
	if v := strings.TrimSpace(string(out)); strings.HasPrefix(v, "{ok,") {
		restore = "application:set_env(rabbit, " + key + ", " + strings.TrimSuffix(strings.TrimPrefix(v, "{ok,"), "}") + ")."
	}
	t.Cleanup(func() {
		if out, err := testenv.Ctl("-q", "eval", restore); err != nil {
			t.Errorf("restore %s (%s): %v\n%s", key, restore, err, out)
		}
	})
	rabbitmqctl(t, "-q", "eval", "application:set_env(rabbit, "+key+", "+value+").")
}

// syncBuffer is a log a test reads while the consumer writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// RabbitMQ closes a channel whose oldest unacked delivery is older than
// consumer_timeout (30 min by default) and returns its deliveries with
// their delivery count raised; a consumer holding deliveries through a
// database outage would get there. The consumer hands its deliveries
// back, in order, before (Config.HoldLimit), and consumes again once the
// database answers: every message is applied exactly once, in key order
// under OrderedByKey, none dead-lettered, and the broker's timeout never
// fires.
//
// consumer_timeout is read when a channel opens and checked at every
// channel tick (channel_tick_interval, 60 s by default): both are lowered
// for the test.
func TestConsumerHandsBackBeforeConsumerTimeout(t *testing.T) {
	const brokerTimeout, tick = 4 * time.Second, 500 * time.Millisecond
	setRabbitEnv(t, "consumer_timeout", fmt.Sprint(brokerTimeout.Milliseconds()))
	setRabbitEnv(t, "channel_tick_interval", fmt.Sprint(tick.Milliseconds()))
	for _, ordered := range []bool{true, false} {
		t.Run(fmt.Sprint("ordered ", ordered), func(t *testing.T) {
			s := testenv.NewSchema(t)
			b := testenv.NewBroker(t)
			queue := inboxQueue(t, b)
			s.DB.MustExec(`CREATE TABLE effects (seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, key text NOT NULL)`)

			// The consumer reaches PostgreSQL through a proxy the test cuts.
			u, err := url.Parse(s.URL)
			if err != nil {
				t.Fatal(err)
			}
			proxy := toxiproxy.NewProxy(toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop()), "pg", "127.0.0.1:0", u.Host)
			if err := proxy.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(proxy.Stop)
			u.Host = proxy.Listen
			db, err := sqlx.Open("postgres", u.String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })

			var logs syncBuffer
			c, err := inbox.New(db, inbox.Config{
				URL: testenv.AMQPURL(), Queue: queue, Consumer: "timeout", ConnectionName: testenv.Unique("timeout"),
				Handler: func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
					_, err := tx.ExecContext(ctx, `INSERT INTO effects (id, key) VALUES ($1, $2)`, m.ID, m.Key)
					return err // a second effect would break the unique id: dedupe must stop it first
				},
				OrderedByKey: ordered, Concurrency: 2, HoldLimit: 1500 * time.Millisecond,
				MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, ReconnectMaxWait: 200 * time.Millisecond,
				Logger: slog.New(slog.NewTextHandler(io.MultiWriter(&logs, testWriter{t}), nil)),
			})
			if err != nil {
				t.Fatal(err)
			}
			stop := runConsumer(c)
			t.Cleanup(func() {
				if err := stop(); err != nil {
					t.Errorf("Run: %v", err)
				}
			})

			ch := b.Channel()
			if err := ch.Confirm(false); err != nil {
				t.Fatal(err)
			}
			n := 0
			publish := func(count int) {
				for range count {
					dc, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), "", queue, true, false, amqp.Publishing{
						MessageId: fmt.Sprintf("m-%03d", n), DeliveryMode: amqp.Persistent, ContentType: "application/json", Body: []byte(`{}`),
						Headers: amqp.Table{inbox.HeaderKey: fmt.Sprint("K", n%3)},
					})
					if err != nil {
						t.Fatal(err)
					}
					if ok, err := dc.WaitContext(context.Background()); err != nil || !ok {
						t.Fatalf("publish not confirmed: %v", err)
					}
					n++
				}
			}
			effects := func() int {
				var k int
				s.DB.Get(&k, `SELECT count(*) FROM effects`)
				return k
			}
			publish(10)
			testenv.Eventually(t, 30*time.Second, "10 effects", func() bool { return effects() == 10 })

			proxy.Stop() // the database unreachable
			outage := time.Now()
			publish(30)
			testenv.Eventually(t, 30*time.Second, "deliveries held", func() bool {
				q, err := b.Channel().QueueDeclarePassive(queue, true, false, false, false, nil)
				return err == nil && q.Messages < 30
			})
			// The outage's length, not a synchronisation: it outlasts the
			// broker's timeout and the tick that would apply it.
			time.Sleep(time.Until(outage.Add(brokerTimeout + 3*tick)))
			if err := proxy.Start(); err != nil {
				t.Fatal(err)
			}
			testenv.Eventually(t, 60*time.Second, "40 effects", func() bool { return effects() == 40 })

			var claims int
			s.DB.Get(&claims, `SELECT count(*) FROM mailroom_inbox WHERE scope = 'timeout'`)
			if claims != 40 {
				t.Errorf("%d inbox claims, want 40", claims)
			}
			if ordered {
				var rows []struct {
					ID  string `db:"id"`
					Key string `db:"key"`
				}
				s.DB.Select(&rows, `SELECT id, key FROM effects ORDER BY seq`)
				last := map[string]string{}
				for _, r := range rows {
					if r.ID < last[r.Key] {
						t.Errorf("key %s: %s applied after %s", r.Key, r.ID, last[r.Key])
					}
					last[r.Key] = r.ID
				}
			}
			if q, err := b.Channel().QueueDeclarePassive(inbox.DeadLetterQueueName(queue), true, false, false, false, nil); err != nil || q.Messages != 0 {
				t.Errorf("dead-letter queue: %+v, %v; want empty", q, err)
			}
			log := logs.String()
			if strings.Contains(log, "delivery acknowledgement") {
				t.Errorf("the broker's consumer timeout closed the channel")
			}
			if !strings.Contains(log, "handing") {
				t.Errorf("the consumer never handed its deliveries back: the outage did not test it")
			}
		})
	}
}
