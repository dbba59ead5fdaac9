package inbox_test

import (
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

func TestDeclareTopologyIsIdempotentAndBinds(t *testing.T) {
	t.Parallel()
	b := testenv.NewBroker(t)
	q, ex := testenv.Unique("q"), testenv.Unique("ex")
	b.CleanupQueues(q, inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
	b.CleanupExchanges(ex, inbox.DeadLetterExchangeName(q))
	topo := inbox.Topology{Queue: q, Exchange: ex, BindingKeys: []string{"order.*"}, SingleActiveConsumer: true}
	for range 2 {
		if err := inbox.DeclareTopology(b.Channel(), topo); err != nil {
			t.Fatal(err)
		}
	}
	ch := b.Channel()
	if err := ch.Publish(ex, "order.placed", true, false, amqp.Publishing{MessageId: "m", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, wait, "message routed to the work queue", func() bool {
		qi, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
		return err == nil && qi.Messages == 1
	})

	// Declaring it as classic now conflicts, and the error says what to do.
	err := inbox.DeclareTopology(b.Channel(), inbox.Topology{Queue: q, Classic: true})
	if err == nil || !strings.Contains(err.Error(), "delete it or declare it as it was") {
		t.Fatalf("conflicting declare: %v", err)
	}
	if err := inbox.DeclareTopology(b.Channel(), inbox.Topology{}); err == nil || !strings.Contains(err.Error(), "Topology.Queue") {
		t.Fatalf("empty queue: %v", err)
	}
}

// A quorum work queue dead-letters, not drops, a message returned more
// often than its delivery limit (a consumer that keeps crashing on it).
func TestDeliveryLimitDeadLetters(t *testing.T) {
	t.Parallel()
	b := testenv.NewBroker(t)
	q := testenv.Unique("q")
	b.CleanupQueues(q, inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
	b.CleanupExchanges(inbox.DeadLetterExchangeName(q))
	if err := inbox.DeclareTopology(b.Channel(), inbox.Topology{Queue: q, DeliveryLimit: 1}); err != nil {
		t.Fatal(err)
	}
	ch := b.Channel()
	if err := ch.Publish("", q, true, false, amqp.Publishing{MessageId: "crasher", Body: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	var dead amqp.Delivery
	testenv.Eventually(t, wait, "message in the dead-letter queue", func() bool {
		if d, ok, err := ch.Get(q, false); err == nil && ok {
			_ = d.Nack(false, true) // as a crashing consumer's unacked delivery
		}
		d, ok, err := ch.Get(inbox.DeadLetterQueueName(q), true)
		if err != nil {
			t.Fatal(err)
		}
		dead = d
		return ok
	})
	if dead.MessageId != "crasher" {
		t.Fatalf("dead letter %+v", dead)
	}
}
