package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/mailroom-go/mailroom/relay"
)

const deadHelp = `Usage: mailroom-relay dead <list|replay|discard> [flags] [ID...]

Dead letters are outbox rows the relay gave up on after --max-attempts
failed publishes (unroutable, nacked, missing exchange), kept with their
last error.

  dead list [--json] [--limit N] [filters]   show them, oldest first
  dead show ID [--json]                      one, with its payload and headers
  dead replay ID... | --all [filters]        move them back into the outbox
  dead discard ID...                         delete them

Filters (all that are given must match): --exchange X, --type T,
--error TEXT (in the last error), --older-than D, --newer-than D (how long
ago the row died, e.g. 10m, 24h).

Run "mailroom-relay dead <subcommand> -h" for details.
`

const deadListHelp = `Usage: mailroom-relay dead list [--json] [--limit N] [filters] [flags]

Lists dead letters in the order they were written: message id, exchange,
routing key, ordering key, attempts, last error and when the row died;
only those matching every filter given (--exchange, --type, --error,
--older-than, --newer-than).
--json prints a JSON array of objects with the fields
id, seq, exchange, routing_key, key, type, content_type, payload_bytes,
attempts, last_error, created_at, dead_at ([] when there are none).
`

const deadShowHelp = `Usage: mailroom-relay dead show [--json] ID

Shows one dead letter whole: its fields, attempts and last error, its
headers and its payload (as text when it is UTF-8, else base64). --json
prints one object: the fields of dead list -json plus "headers" and
"payload" (base64). Exit status 1 when the id is not a dead letter.
`

const deadReplayHelp = `Usage: mailroom-relay dead replay [flags] ID... | --all [filters]

Moves the dead letters with these message ids back into the outbox in one
transaction: attempts start again at 0, the row is due at once, and id,
payload, headers and creation time are kept. If an id is not a dead letter,
nothing is replayed (exit status 1).

--all moves every dead letter up to the newest one there when it starts
(with filters: every one that matches them, e.g. --all --exchange orders
--error "exchange does not exist" once the exchange exists), oldest
first, 1000 per transaction; if it stops early (an error, Ctrl-C),
the rows it moved stay moved and the error says how many: run it again for
the rest.

Per-key order: a replayed row goes to the END of its key. It gets a new
sequence number, so rows of the same key written after it and still pending
are published before it, and consumers see it after everything of its key
already published. Replayed rows keep their order among themselves.
`

const deadDiscardHelp = `Usage: mailroom-relay dead discard [flags] ID...

Deletes the dead letters with these message ids, in one transaction. If an
id is not a dead letter, nothing is deleted (exit status 1). There is no
--all: discarding is not undoable; list the ids first.
`

func cmdDead(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, deadHelp)
		return usageErr("dead: missing subcommand: list, replay or discard (see mailroom-relay dead -h)")
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, deadHelp)
		return nil
	case "list":
		return cmdDeadList(args[1:], stdout, stderr)
	case "show":
		return cmdDeadShow(args[1:], stdout, stderr)
	case "replay":
		return cmdDeadMove(args[1:], true, stdout, stderr)
	case "discard":
		return cmdDeadMove(args[1:], false, stdout, stderr)
	default:
		return usageErr("dead: unknown subcommand %q: use list, show, replay or discard (see mailroom-relay dead -h)", args[0])
	}
}

func cmdDeadList(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("dead list", deadListHelp, stdout)
	var c common
	c.register(fs)
	asJSON := fs.Bool("json", false, "print a JSON array")
	limit := fs.Int("limit", relay.DefaultDeadListLimit, "show at most this many")
	filter := registerDeadFilter(fs)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *limit < 1 {
		return usageErr("dead list: --limit %d: must be at least 1", *limit)
	}
	if err := checkDeadFilter("dead list", *filter); err != nil {
		return err
	}
	ctx, admin, done, err := c.connectAdmin(30 * time.Second)
	if err != nil {
		return err
	}
	defer done()
	dead, err := admin.ListDeadWhere(ctx, *filter, *limit)
	if err != nil {
		return c.hint(err)
	}
	if *asJSON {
		if dead == nil {
			dead = []relay.DeadLetter{}
		}
		return json.NewEncoder(stdout).Encode(dead)
	}
	if len(dead) == 0 {
		fmt.Fprintln(stdout, "no dead letters")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tEXCHANGE\tROUTING KEY\tKEY\tATTEMPTS\tDEAD AT\tLAST ERROR")
	for _, d := range dead {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", d.ID, orDash(d.Exchange), orDash(d.RoutingKey), orDash(d.Key), d.Attempts,
			d.DeadAt.UTC().Format(time.RFC3339), oneLine(d.LastError))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(dead) == *limit && *filter == (relay.DeadFilter{}) {
		if st, err := admin.Status(ctx); err == nil && st.Dead > int64(len(dead)) {
			fmt.Fprintf(stdout, "(%d of %d shown; raise --limit to see more)\n", len(dead), st.Dead)
		}
	}
	return nil
}

func cmdDeadMove(args []string, replay bool, stdout, stderr io.Writer) error {
	name, help := "dead discard", deadDiscardHelp
	if replay {
		name, help = "dead replay", deadReplayHelp
	}
	fs := newFlagSet(name, help, stdout)
	var c common
	c.register(fs)
	all := new(bool)
	filter := new(relay.DeadFilter)
	if replay {
		fs.BoolVar(all, "all", false, "replay every dead letter (that matches the filters)")
		filter = registerDeadFilter(fs)
	}
	ids, err := parseArgs(fs, args, stderr)
	if err != nil {
		return err
	}
	switch {
	case *all && len(ids) > 0:
		return usageErr("%s: give ids or --all, not both", name)
	case !*all && *filter != (relay.DeadFilter{}):
		return usageErr("%s: filters select what --all replays: add --all, or give ids without filters", name)
	case !*all && len(ids) == 0 && replay:
		return usageErr("%s: no ids: give the message ids to replay (from `mailroom-relay dead list`), or --all", name)
	case len(ids) == 0 && !replay:
		return usageErr("%s: no ids: give the message ids to discard (from `mailroom-relay dead list`)", name)
	}
	for _, id := range ids {
		if _, err := uuid.Parse(id); err != nil {
			return usageErr("%s: %q is not a message id (a UUID; copy it from `mailroom-relay dead list`)", name, id)
		}
	}
	if err := checkDeadFilter(name, *filter); err != nil {
		return err
	}
	ctx, admin, done, err := c.connectAdmin(5 * time.Minute)
	if err != nil {
		return err
	}
	defer done()
	var n int64
	switch {
	case *all:
		n, err = admin.ReplayDeadWhere(ctx, *filter)
	case replay:
		n, err = admin.ReplayDead(ctx, ids)
	default:
		n, err = admin.DiscardDead(ctx, ids)
	}
	if errors.Is(err, relay.ErrInvalidID) {
		return usageErr("%s: %v", name, err)
	}
	if err != nil {
		return c.hint(err)
	}
	if replay {
		fmt.Fprintf(stdout, "replayed %d dead letter(s) into the outbox\n", n)
	} else {
		fmt.Fprintf(stdout, "discarded %d dead letter(s)\n", n)
	}
	return nil
}

// registerDeadFilter adds the dead-letter filters to fs.
func registerDeadFilter(fs *flag.FlagSet) *relay.DeadFilter {
	f := new(relay.DeadFilter)
	fs.StringVar(&f.Exchange, "exchange", "", "only dead letters of this exchange")
	fs.StringVar(&f.Type, "type", "", "only dead letters of this message type")
	fs.StringVar(&f.Error, "error", "", "only dead letters whose last error contains this text")
	fs.DurationVar(&f.MinAge, "older-than", 0, "only rows dead for at least this long (e.g. 1h)")
	fs.DurationVar(&f.MaxAge, "newer-than", 0, "only rows dead for at most this long (e.g. 10m)")
	return f
}

func checkDeadFilter(name string, f relay.DeadFilter) error {
	switch {
	case f.MinAge < 0:
		return usageErr("%s: --older-than %s: must be positive", name, f.MinAge)
	case f.MaxAge < 0:
		return usageErr("%s: --newer-than %s: must be positive", name, f.MaxAge)
	case f.MaxAge > 0 && f.MaxAge < f.MinAge:
		return usageErr("%s: --newer-than %s is shorter than --older-than %s: nothing can match", name, f.MaxAge, f.MinAge)
	}
	return nil
}

func cmdDeadShow(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("dead show", deadShowHelp, stdout)
	var c common
	c.register(fs)
	asJSON := fs.Bool("json", false, "print one JSON object")
	ids, err := parseArgs(fs, args, stderr)
	if err != nil {
		return err
	}
	if len(ids) != 1 {
		return usageErr("dead show: give one message id (from `mailroom-relay dead list`)")
	}
	if _, err := uuid.Parse(ids[0]); err != nil {
		return usageErr("dead show: %q is not a message id (a UUID; copy it from `mailroom-relay dead list`)", ids[0])
	}
	ctx, admin, done, err := c.connectAdmin(30 * time.Second)
	if err != nil {
		return err
	}
	defer done()
	d, err := admin.ShowDead(ctx, ids[0])
	if err != nil {
		return c.hint(err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(d)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	for _, f := range [][2]string{
		{"id", d.ID}, {"seq", strconv.FormatInt(d.Seq, 10)}, {"exchange", orDash(d.Exchange)}, {"routing key", orDash(d.RoutingKey)},
		{"key", orDash(d.Key)}, {"type", orDash(d.Type)}, {"content type", orDash(d.ContentType)},
		{"attempts", strconv.Itoa(d.Attempts)}, {"last error", oneLine(d.LastError)},
		{"created at", d.CreatedAt.UTC().Format(time.RFC3339Nano)}, {"dead at", d.DeadAt.UTC().Format(time.RFC3339Nano)},
	} {
		fmt.Fprintf(tw, "%s\t%s\n", f[0], f[1])
	}
	keys := make([]string, 0, len(d.Headers))
	for k := range d.Headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(tw, "header %s\t%s\n", k, d.Headers[k])
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if utf8.Valid(d.Payload) {
		fmt.Fprintf(stdout, "payload (%d bytes):\n%s\n", len(d.Payload), d.Payload)
	} else {
		fmt.Fprintf(stdout, "payload (%d bytes, base64):\n%s\n", len(d.Payload), base64.StdEncoding.EncodeToString(d.Payload))
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
