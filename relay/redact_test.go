package relay_test

import (
	"strings"
	"testing"

	"github.com/mailroom-go/mailroom/relay"
)

// New rejects a DatabaseURL lib/pq cannot use with an error that names the
// field and hides the secret: lib/pq's own errors quote the URL, and would
// otherwise surface from Run's listener and wake lock.
func TestNewDatabaseURLErrorsHideSecrets(t *testing.T) {
	t.Parallel()
	const leak = "s3cr3t-XYZ"
	for _, dsn := range []string{
		"postgres://root:" + leak + "@127.0.0.1:bad/test",
		"postgres://root:" + leak + "/x@127.0.0.1/test",
		"root:" + leak + "@127.0.0.1:5432/test",
		"host=127.0.0.1 password=" + leak + " sslmode=bogus",
		"postgres://root@127.0.0.1/test?sslmode=bogus&password=" + leak,
	} {
		_, err := relay.New(nil, relay.Config{URL: "amqp://x", DatabaseURL: dsn})
		if err == nil || !strings.Contains(err.Error(), "Config.DatabaseURL") || strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("New with DatabaseURL %q: %v; want an error naming Config.DatabaseURL without the secret", dsn, err)
		}
	}
	if _, err := relay.New(nil, relay.Config{URL: "amqp://x", DatabaseURL: "host=127.0.0.1 password='" + leak + " x' dbname=test"}); err != nil {
		t.Errorf("a key=value DatabaseURL: %v", err)
	}
}
