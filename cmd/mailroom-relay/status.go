package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/redact"
	"github.com/mailroom-go/mailroom/relay"
)

const statusHelp = `Usage: mailroom-relay status [--json] [flags]

Prints what is waiting in the outbox: pending rows (of which scheduled for
later, retrying after a failure, in flight), how long the oldest pending
row has waited since it was due, or since it was written once it failed
(the lag: alert on it), the number of dead letters and
the number of relays running on the outbox (publishing, or standing by
to take over; relays run with --no-listen show themselves by a row every
5 s instead of a session lock, and are counted apart as polling).

It also prints the outbox's live and dead tuples and what holds the
database's vacuum horizon back (the oldest transaction's age, and who holds
it), flagged past --horizon-warn: while it is held, the rows the relay
deletes cannot be cleaned up and claims slow down.

--json prints one object:
  {"pending": 3, "scheduled": 0, "retrying": 1, "in_flight": 2,
   "oldest_pending_age_seconds": 1.5, "dead": 0, "relays": 2, "polling": 0, "publishing": 1,
   "outbox_dead_tuples": 120, "outbox_live_tuples": 3,
   "outbox_last_vacuum": "2025-01-02T15:04:05Z", "horizon_age_seconds": 0.2,
   "horizon_xmin_age": 4, "horizon_held_by": "pid 4242 (application_name \"billing\", active)"}
The ages are 0 when nothing is pending or holds the horizon, never null;
outbox_last_vacuum is null when the outbox was never vacuumed.
`

func cmdStatus(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", statusHelp, stdout)
	var c common
	c.register(fs)
	asJSON := fs.Bool("json", false, "print one JSON object")
	var warn time.Duration
	horizonWarnFlag(fs, &warn)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if err := checkEnv(fs); err != nil {
		return err
	}
	if warn < 0 {
		return usageErr("--horizon-warn %s: must be positive, or 0 to turn the warning off", warn)
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
	h, err := admin.Horizon(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		// One object: the StatusReport's keys, then the HorizonReport's.
		a, err := json.Marshal(st)
		if err != nil {
			return err
		}
		b, err := json.Marshal(h)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s,%s\n", a[:len(a)-1], b[1:])
		return err
	}
	fmt.Fprintf(stdout, "pending             %d (scheduled %d, retrying %d, in flight %d)\n", st.Pending, st.Scheduled, st.Retrying, st.InFlight)
	fmt.Fprintf(stdout, "oldest pending age  %s\n", st.OldestPendingAge.Round(time.Millisecond))
	fmt.Fprintf(stdout, "dead letters        %d\n", st.Dead)
	fmt.Fprintf(stdout, "relays running      %d (publishing %d, standing by %d, polling %d)\n", st.Relays, st.Publishing, max(st.Relays-st.Publishing-st.Polling, 0), st.Polling)
	vacuumed := "never vacuumed"
	if !h.LastVacuum.IsZero() {
		vacuumed = "last vacuum " + time.Since(h.LastVacuum).Round(time.Second).String() + " ago"
	}
	fmt.Fprintf(stdout, "outbox tuples       %d live, %d dead (%s)\n", h.LiveTuples, h.DeadTuples, vacuumed)
	fmt.Fprintf(stdout, "vacuum horizon      %s\n", horizonLine(h, warn))
	return nil
}

// defaultHorizonWarn is --horizon-warn's default: a transaction open this
// long is rarely meant to be.
const defaultHorizonWarn = 5 * time.Minute

// horizonWarnFlag registers --horizon-warn (run warns, status and the
// status page flag the horizon past it).
func horizonWarnFlag(fs *flag.FlagSet, d *time.Duration) {
	fs.DurationVar(d, "horizon-warn", envDurationOr("MAILROOM_HORIZON_WARN", defaultHorizonWarn), "flag (and, in run, log a warning) when a transaction has held the database's vacuum horizon back this long: dead rows then pile up in the outbox and claims slow down; 0 turns it off [$MAILROOM_HORIZON_WARN]")
}

// horizonPast reports whether h's oldest transaction is past warn (0: never).
func horizonPast(h relay.HorizonReport, warn time.Duration) bool {
	return warn > 0 && h.Age >= warn
}

// heldBy names what holds h's horizon: past warn, the holders open that
// long (the ones to end, at most 5), otherwise the holder with the oldest
// xmin.
func heldBy(h relay.HorizonReport, warn time.Duration) string {
	if !horizonPast(h, warn) {
		return h.HeldBy
	}
	var names []string
	for _, hh := range h.Holders {
		if hh.Age >= warn {
			names = append(names, hh.String())
		}
	}
	if len(names) > 5 {
		names = append(names[:5], fmt.Sprintf("%d more", len(names)-5))
	}
	return strings.Join(names, "; ")
}

// horizonLine is the horizon in one line, for status and the status page.
func horizonLine(h relay.HorizonReport, warn time.Duration) string {
	if len(h.Holders) == 0 {
		return "not held back"
	}
	line := fmt.Sprintf("held %s (xmin age %d) by %s", h.Age.Round(time.Millisecond), h.XminAge, heldBy(h, warn))
	if horizonPast(h, warn) {
		line += fmt.Sprintf(" -- PAST %s: end it (docs/operations.md, %q)", warn, horizonSection)
	}
	return line
}

// horizonSection is the section of docs/operations.md that says what to do.
const horizonSection = "Vacuum horizon and dead tuples"

// hint adds what to do to a database error an operator can fix.
func (c *common) hint(err error) error {
	var pe *pq.Error
	if errors.As(err, &pe) && pe.Code == "42P01" { // undefined_table
		return fmt.Errorf("%w (the mailroom tables are missing in %s: run `mailroom-relay migrate`, or check search_path and the table flags)", err, redact.String(c.databaseURL))
	}
	return err
}
