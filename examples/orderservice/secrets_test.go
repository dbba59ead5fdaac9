package main

import (
	"strings"
	"testing"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// The demo's error output for every form of connection string with a
// secret in it (unreachable, refused, unparsable) never shows the secret,
// whole, cut short or percent-encoded.
func TestDemoErrorsHideSecrets(t *testing.T) {
	t.Parallel()
	const leak, needle = "s3cr3t-XYZ", "s3cr3t"
	closed := closedPort(t)
	host, port, _ := strings.Cut(closed, ":")
	for _, tc := range []struct{ name, env, value string }{
		{"URL userinfo", "DATABASE_URL", "postgres://root:" + leak + "@" + closed + "/test?sslmode=disable"},
		{"URL ?password=", "DATABASE_URL", "postgres://root@" + closed + "/test?sslmode=disable&password=" + leak},
		{"URL percent-encoded", "DATABASE_URL", "postgres://root:" + strings.ReplaceAll(leak, "-", "%2D") + "@" + closed + "/test?sslmode=disable"},
		{"key=value", "DATABASE_URL", "host=" + host + " port=" + port + " user=root password=" + leak + " dbname=test sslmode=disable"},
		{"key=value quoted", "DATABASE_URL", "host=" + host + " port=" + port + " user=root password='" + leak + ` a\' b' dbname=test sslmode=disable`},
		{"URL without a scheme", "DATABASE_URL", "root:" + leak + "@" + closed + "/test"},
		{"invalid port", "DATABASE_URL", "postgres://root:" + leak + "@127.0.0.1:bad/test"},
		{"unencoded slash", "DATABASE_URL", "postgres://root:" + leak + "/x@" + closed + "/test"},
		{"refused", "DATABASE_URL", "postgres://root:" + leak + "@127.0.0.1:5432/no_such_db?sslmode=disable&password=" + leak},
		{"AMQP unreachable", "AMQP_URL", "amqp://guest:" + leak + "@" + closed + "/?token=" + leak},
		{"AMQP refused", "AMQP_URL", "amqp://guest:" + leak + "@" + strings.TrimPrefix(strings.TrimPrefix(testenv.AMQPURL(), "amqp://"), "guest:guest@")},
		{"AMQP invalid port", "AMQP_URL", "amqp://guest:" + leak + "@127.0.0.1:bad/"},
		{"AMQP unencoded slash", "AMQP_URL", "amqp://guest:" + leak + "/x@127.0.0.1/"},
		{"AMQP without a scheme", "AMQP_URL", "guest:" + leak + "@" + closed + "/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{"DATABASE_URL": testenv.DatabaseURL(), "AMQP_URL": testenv.AMQPURL(), tc.env: tc.value}
			var stdout, stderr strings.Builder
			code := run([]string{"demo", "--orders", "1"}, func(k string) string { return env[k] }, &stdout, &stderr)
			if code == 0 {
				t.Fatalf("exit 0, want a failure; stderr:\n%s", stderr.String())
			}
			if out := stdout.String() + stderr.String(); strings.Contains(out, needle) || !strings.Contains(out, tc.env) {
				t.Fatalf("output shows the secret, or does not name %s:\n%s", tc.env, out)
			}
		})
	}
}
