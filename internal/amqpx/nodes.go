package amqpx

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/redact"
)

// Nodes are the addresses of one broker: one URL, or the nodes of one
// cluster. A dial tries them in turn, from a random one so that instances
// spread over the cluster, and after a connection is lost it starts with
// the node after the one it had, so a dead node is tried last.
type Nodes struct {
	urls []string
	next atomic.Uint32 // index of the node the next dial tries first
}

// ParseNodes reads the broker's addresses from a URL setting (one URL or
// several separated by commas) and a URLs setting (a list); set one of
// them. Its errors start with the setting's name ("URL: …", "URLs: …") for
// the caller to prefix with its own ("relay: Config." + err).
func ParseNodes(url string, urls []string) (*Nodes, error) {
	field, list := "URL", urls
	switch {
	case url != "" && len(urls) > 0:
		return nil, errors.New("URL and URLs: both set; set URL (one URL, or several separated by commas) or URLs, not both")
	case len(urls) > 0:
		field = "URLs"
	case url == "":
		return nil, errors.New("URL: required, e.g. amqp://guest:guest@127.0.0.1:5672/ (or several, separated by commas: the nodes of one cluster)")
	default:
		list = strings.Split(url, ",")
	}
	n := &Nodes{}
	for i, u := range list {
		u = strings.TrimSpace(u)
		if !IsURL(u) {
			what := field
			if len(list) > 1 {
				what = fmt.Sprintf("%s: node %d of %d", field, i+1, len(list))
			}
			if u == "" {
				return nil, fmt.Errorf("%s: empty; give each node's amqp:// or amqps:// URL", what)
			}
			return nil, fmt.Errorf("%s: %s is not an amqp:// or amqps:// URL", what, redact.String(u))
		}
		n.urls = append(n.urls, u)
	}
	n.next.Store(uint32(rand.IntN(len(n.urls))))
	return n, nil
}

// Single is the URL when there is one node, else "".
func (n *Nodes) Single() string {
	if len(n.urls) == 1 {
		return n.urls[0]
	}
	return ""
}

// Len is how many nodes there are.
func (n *Nodes) Len() int { return len(n.urls) }

// String lists the nodes, secrets redacted.
func (n *Nodes) String() string { return redact.String(strings.Join(n.urls, ",")) }

// dial connects to the first node that answers, trying each once.
func (n *Nodes) dial(cfg func() amqp.Config) (*amqp.Connection, error) {
	start := int(n.next.Load())
	var errs []string
	for i := range n.urls {
		k := (start + i) % len(n.urls)
		conn, err := dialConfig(n.urls[k], cfg())
		if err == nil {
			n.next.Store(uint32((k + 1) % len(n.urls)))
			return conn, nil
		}
		errs = append(errs, err.Error())
	}
	if len(errs) == 1 {
		return nil, errors.New(errs[0])
	}
	return nil, fmt.Errorf("no node of the cluster answers: %s", strings.Join(errs, "; "))
}

// Dial connects once to the first node that answers. name becomes the
// connection_name client property (see Dial).
func (n *Nodes) Dial(name string) (*amqp.Connection, error) {
	return n.dial(func() amqp.Config { return config(name) })
}

// DialRetry dials the nodes until one answers or ctx ends, waiting between
// rounds with exponential backoff (capped at maxWait). onError sees each
// failed round.
func (n *Nodes) DialRetry(ctx context.Context, name string, maxWait time.Duration, onError func(error, time.Duration)) (*amqp.Connection, error) {
	return retry(ctx, maxWait, onError, func() (*amqp.Connection, error) { return n.Dial(name) })
}
