package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/redact"
)

const statusHelp = `Usage: mailroom-relay status [--json] [flags]

Prints what is waiting in the outbox: pending rows (of which scheduled for
later, retrying after a failure, in flight), how long the oldest pending
row has waited since it was due, or since it was written once it failed
(the lag: alert on it), the number of dead letters and
the number of relays running on the outbox (publishing, or standing by
to take over).

--json prints one object:
  {"pending": 3, "scheduled": 0, "retrying": 1, "in_flight": 2,
   "oldest_pending_age_seconds": 1.5, "dead": 0, "relays": 2, "publishing": 1}
The age is 0 when nothing is pending, never null.
`

func cmdStatus(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", statusHelp, stdout)
	var c common
	c.register(fs)
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	ctx, admin, done, err := c.connectAdmin(30 * time.Second)
	if err != nil {
		return err
	}
	defer done()
	st, err := admin.Status(ctx)
	if err != nil {
		return c.hint(err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(st)
	}
	fmt.Fprintf(stdout, "pending             %d (scheduled %d, retrying %d, in flight %d)\n", st.Pending, st.Scheduled, st.Retrying, st.InFlight)
	fmt.Fprintf(stdout, "oldest pending age  %s\n", st.OldestPendingAge.Round(time.Millisecond))
	fmt.Fprintf(stdout, "dead letters        %d\n", st.Dead)
	fmt.Fprintf(stdout, "relays running      %d (publishing %d, standing by %d)\n", st.Relays, st.Publishing, max(st.Relays-st.Publishing, 0))
	return nil
}

// hint adds what to do to a database error an operator can fix.
func (c *common) hint(err error) error {
	var pe *pq.Error
	if errors.As(err, &pe) && pe.Code == "42P01" { // undefined_table
		return fmt.Errorf("%w (the mailroom tables are missing in %s: run `mailroom-relay migrate`, or check search_path and the table flags)", err, redact.String(c.databaseURL))
	}
	return err
}
