package redact_test

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"strings"
	"testing"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/redact"
)

const leak = "s3cr3t-XYZ"

// needle catches the secret whole, cut short or percent-encoded.
const needle = "s3cr3t"

func TestString(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ name, in, want string }{
		{"URL userinfo", "postgres://root:" + leak + "@db:5432/app?sslmode=disable", "postgres://root:xxxxx@db:5432/app?sslmode=disable"},
		{"URL percent-encoded password", "postgres://root:" + url.QueryEscape(leak+"@/") + "@db/app", "postgres://root:xxxxx@db/app"},
		{"URL unencoded @ in password", "postgres://root:" + leak + "@x@db/app", "postgres://root:xxxxx@db/app"},
		{"URL ?password=", "postgres://root@db/app?sslmode=disable&password=" + leak + "&search_path=s", "postgres://root@db/app?sslmode=disable&password=xxxxx&search_path=s"},
		{"URL ?sslpassword= and ?passfile=", "postgresql://db/app?sslpassword=" + leak + "&passfile=/home/" + leak, "postgresql://db/app?sslpassword=xxxxx&passfile=xxxxx"},
		{"URL token-like params", "amqps://u@mq/vh?token=" + leak + "&access_token=" + leak + "&api_key=" + leak + "&Client_Secret=" + leak + "&heartbeat=10", "amqps://u@mq/vh?token=xxxxx&access_token=xxxxx&api_key=xxxxx&Client_Secret=xxxxx&heartbeat=10"},
		{"URL encoded key", "postgres://db/app?pass%77ord=" + leak, "postgres://db/app?pass%77ord=xxxxx"},
		{"URL no secret", "postgres://root@127.0.0.1:5432/test?sslmode=disable", "postgres://root@127.0.0.1:5432/test?sslmode=disable"},
		{"amqp URL", "amqp://guest:" + leak + "@127.0.0.1:5672/", "amqp://guest:xxxxx@127.0.0.1:5672/"},
		{"amqp cluster", "amqp://guest:" + leak + "@n1:5672/, amqps://guest:" + leak + "@n2:5671/vh", "amqp://guest:xxxxx@n1:5672/,amqps://guest:xxxxx@n2:5671/vh"},
		{"no scheme", "root:" + leak + "@db:5432/app", "root:xxxxx@db:5432/app"},
		{"no scheme, host only", "db:5432", "db:5432"},
		{"key=value", "host=db port=5432 user=root password=" + leak + " dbname=app", "host=db port=5432 user=root password=xxxxx dbname=app"},
		{"key=value quoted", `host=db password='` + leak + ` a\' b' dbname=app`, `host=db password=xxxxx dbname=app`},
		{"key=value escaped unquoted", `password=` + leak + `\ x dbname=app`, `password=xxxxx dbname=app`},
		{"key=value spaces around =", "host = db\tpassword = " + leak + "  sslpassword='" + leak + "'", "host = db\tpassword = xxxxx  sslpassword=xxxxx"},
		{"key=value empty password", "host=db password='' dbname=app", "host=db password=xxxxx dbname=app"},
		{"key=value unterminated quote", "host=db password='" + leak, redact.Unparsable},
		{"key=value missing =", "host=db password " + leak, redact.Unparsable},
		{"invalid port", "postgres://root:" + leak + "@db:bad/app", redact.Unparsable},
		{"unencoded slash", "postgres://root:" + leak + "/x@db/app", redact.Unparsable},
		{"unencoded #, numeric", "postgres://root:1234#" + leak + "@db/app", redact.Unparsable},
		{"unencoded ?, numeric", "postgres://root:1234?" + leak + "@db/app", redact.Unparsable},
		{"bad escape", "postgres://root:" + leak + "%zz@db/app", redact.Unparsable},
		{"scheme without //", "postgres:root:" + leak + "@db", "postgres:xxxxx@db"},
		{"empty", "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got := redact.String(c.in)
			if got != c.want {
				t.Errorf("String(%q) = %q, want %q", c.in, got, c.want)
			}
			if strings.Contains(got, needle) {
				t.Errorf("String(%q) = %q shows the secret", c.in, got)
			}
		})
	}
}

// The errors lib/pq and amqp091-go return for a connection string quote
// it, whole or in part; Text hides the secret in each, or withholds the
// text when the string does not parse.
func TestTextOfLibraryErrors(t *testing.T) {
	t.Parallel()
	for _, dsn := range []string{
		"postgres://root:" + leak + "@db:bad/app",
		"postgres://root:" + leak + "/x@db/app",
		"postgres://root:" + leak + "%zz@db/app",
		"root:" + leak + "@db:5432/app", // lib/pq: missing "=" after "root:…" in connection info string
		"host=db password=" + leak + " port",
		"host=db password='" + leak + " sslmode=bogus",
		"host=db password='" + leak + `\' x' sslmode=bogus`,
		"postgres://root:" + leak + "@db/app?sslmode=bogus&password=" + leak,
	} {
		_, err := pq.NewConnector(dsn)
		if err == nil {
			t.Fatalf("pq.NewConnector(%q) took it", dsn)
		}
		if got := redact.Text(err.Error(), dsn); strings.Contains(got, needle) {
			t.Errorf("Text of %q: %s", err, got)
		}
	}
	for _, u := range []string{
		"amqp://guest:" + leak + "@mq:bad/",
		"amqp://guest:" + leak + "/x@mq/",
		"guest:" + leak + "@mq/",
		"http://guest:" + leak + "@mq/?password=" + leak,
	} {
		_, err := amqp.ParseURI(u)
		if err == nil {
			t.Fatalf("amqp.ParseURI(%q) took it", u)
		}
		if got := redact.Text(fmt.Sprintf("dial %s: %v", u, err), u); strings.Contains(got, needle) {
			t.Errorf("Text of %q: %s", err, got)
		}
	}
	// A decoded password in a message is hidden too.
	u := "postgres://root:" + strings.ReplaceAll(leak, "-", "%2D") + "@db/app"
	if got := redact.Text("user root with password "+leak+" refused", u); got != "user root with password xxxxx refused" {
		t.Errorf("decoded password: %s", got)
	}
}

func TestError(t *testing.T) {
	t.Parallel()
	dsn := "postgres://root:" + leak + "@db/app"
	base := &fs.PathError{Op: "open", Path: dsn, Err: fs.ErrNotExist}
	err := redact.Error(fmt.Errorf("connect: %w", base), dsn)
	if strings.Contains(err.Error(), needle) || !strings.Contains(err.Error(), "root:xxxxx@db") {
		t.Errorf("Error = %q", err)
	}
	if strings.Contains(fmt.Sprintf("%+v", err), needle) || errors.Unwrap(err) != nil {
		t.Errorf("the original error is reachable by printing or unwrapping: %+v", err)
	}
	var pe *fs.PathError
	if !errors.Is(err, fs.ErrNotExist) || !errors.As(err, &pe) {
		t.Errorf("errors.Is/As lost the chain of %v", err)
	}
	plain := errors.New("connection refused")
	if redact.Error(plain, dsn) != plain || redact.Error(nil, dsn) != nil {
		t.Error("an error with nothing to hide should come back as it is")
	}
}
