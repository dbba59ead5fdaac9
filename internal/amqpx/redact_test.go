package amqpx

import (
	"strings"
	"testing"
)

// Dial's errors name the broker without its secrets, whatever the form of
// the URL; amqp091's own parse errors quote the URL whole.
func TestDialErrorsHideSecrets(t *testing.T) {
	t.Parallel()
	const leak = "s3cr3t-XYZ"
	for _, u := range []string{
		"amqp://guest:" + leak + "@127.0.0.1:1/",
		"amqp://guest@127.0.0.1:1/?token=" + leak,
		"amqp://guest:" + leak + "@127.0.0.1:bad/",
		"amqp://guest:" + leak + "/x@127.0.0.1/",
		"guest:" + leak + "@127.0.0.1:1/",
		"http://guest:" + leak + "@127.0.0.1:1/?password=" + leak,
	} {
		conn, err := Dial(u, "redact-test")
		if err == nil {
			conn.Close()
			t.Fatalf("Dial(%q) connected", u)
		}
		if strings.Contains(err.Error(), "s3cr3t") || !strings.Contains(err.Error(), "connect to RabbitMQ at ") {
			t.Errorf("Dial error: %v", err)
		}
	}
}
