package pipeline_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// One trace across processes, as a service deploys mailroom with the
// sidecar: the writer's span (this process) → the publish span of the
// mailroom-relay binary, exported through the standard OpenTelemetry
// environment (console exporter) → the consumer's process span (this
// process), all one trace id, each the parent of the next.
func TestTraceThroughTheSidecar(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	prop := propagation.TraceContext{}

	ctx, root := tp.Tracer("test").Start(context.Background(), "POST /orders")
	p.add(ctx, outbox.Message{Exchange: p.ex, RoutingKey: "order.placed", Type: "order.placed", Payload: []byte(`{}`)})
	root.End()

	bin := testenv.BuildBinary(t, "github.com/mailroom-go/mailroom/cmd/mailroom-relay")
	cmd := exec.Command(bin, "run", "--http", "127.0.0.1:0", "--name", testenv.Unique("trace"), "--poll-interval", "50ms")
	cmd.Env = []string{"DATABASE_URL=" + p.s.URL, "AMQP_URL=" + testenv.AMQPURL(), "OTEL_TRACES_EXPORTER=console", "OTEL_SERVICE_NAME=relay"}
	var stdout lockedBuffer
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case err := <-exited:
				if err != nil {
					t.Errorf("sidecar exit: %v", err)
				}
			case <-time.After(wait):
				_ = cmd.Process.Kill()
				t.Error("sidecar did not stop on SIGTERM")
			}
		}
	}
	t.Cleanup(stop)

	got := make(chan trace.SpanContext, 1)
	p.runInbox(inbox.Config{TracerProvider: tp, Propagator: prop, Handler: func(ctx context.Context, _ *sqlx.Tx, m inbox.Message) error {
		got <- trace.SpanContextFromContext(ctx)
		return nil
	}})
	var hsc trace.SpanContext
	select {
	case hsc = <-got:
	case <-time.After(wait):
		t.Fatal("handler not called")
	}
	stop() // flushes the sidecar's batched spans

	type span struct {
		Name        string
		SpanContext struct{ TraceID, SpanID string }
		Parent      struct{ SpanID string }
	}
	var publish span
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	for dec.More() {
		var s span
		if err := dec.Decode(&s); err != nil {
			t.Fatalf("the sidecar's stdout is not the console exporter's JSON: %v\n%s", err, stdout.Bytes())
		}
		if s.Name == "publish "+p.ex {
			publish = s
		}
	}
	if publish.Name == "" {
		t.Fatalf("no publish span from the sidecar:\n%s", stdout.Bytes())
	}
	rootSC := root.SpanContext()
	if publish.SpanContext.TraceID != rootSC.TraceID().String() || publish.Parent.SpanID != rootSC.SpanID().String() {
		t.Errorf("sidecar's publish span in trace %s under %s, want the writer's %s under %s", publish.SpanContext.TraceID, publish.Parent.SpanID, rootSC.TraceID(), rootSC.SpanID())
	}
	if hsc.TraceID() != rootSC.TraceID() {
		t.Errorf("handler in trace %s, want the writer's %s", hsc.TraceID(), rootSC.TraceID())
	}
	var process sdktrace.ReadOnlySpan
	testenv.Eventually(t, wait, "the process span ended", func() bool {
		for _, s := range rec.Ended() {
			if s.SpanKind() == trace.SpanKindConsumer {
				process = s
			}
		}
		return process != nil
	})
	if process.Parent().SpanID().String() != publish.SpanContext.SpanID {
		t.Errorf("process span's parent %s, want the sidecar's publish span %s", process.Parent().SpanID(), publish.SpanContext.SpanID)
	}
}

// lockedBuffer is a bytes.Buffer a child process writes while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]byte(nil), l.b.Bytes()...)
}
