package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

const healthcheckHelp = `Usage: mailroom-relay healthcheck [flags]

Asks a running relay's /readyz (on --http, as "run" serves it) and exits 0
when it answers 200, 1 otherwise, with one line saying why. For a container
health check where the image has no shell or curl (the distroless image):

  HEALTHCHECK CMD ["/mailroom-relay", "healthcheck"]
`

func cmdHealthcheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("healthcheck", healthcheckHelp, stdout)
	addr := fs.String("http", envOr("MAILROOM_HTTP", "127.0.0.1:9108"), "the address \"run\" listens on [$MAILROOM_HTTP]")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the answer")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *timeout <= 0 {
		return usageErr("healthcheck: --timeout %s: must be positive", *timeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	url := "http://" + *addr + "/readyz"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return usageErr("healthcheck: --http %q: %v", *addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("not ready: %v (is \"mailroom-relay run\" listening on %s? set --http or MAILROOM_HTTP)", err, *addr)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("not ready: %s answered %d: %s", url, resp.StatusCode, body)
	}
	fmt.Fprintf(stdout, "ready: %s\n", body)
	return nil
}
