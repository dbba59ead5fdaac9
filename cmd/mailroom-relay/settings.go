package main

import (
	"flag"
	"regexp"
)

// setting binds a flag to the environment variable it falls back to and,
// for the flags that set a library Config field, that field. This table,
// not the help text, says which variable a flag overrides (checkEnv) and
// which flag a library error means (namedForUser).
type setting struct{ flag, env, field string }

var settings = []setting{
	{"database-url", "DATABASE_URL", "DatabaseURL"},
	{"outbox-table", "MAILROOM_OUTBOX_TABLE", "Tables.Outbox"},
	{"dead-table", "MAILROOM_DEAD_TABLE", "Tables.Dead"},
	{"published-table", "MAILROOM_PUBLISHED_TABLE", "Tables.Published"},
	{"inbox-table", "MAILROOM_INBOX_TABLE", "Tables.Inbox"},
	{"log-level", "MAILROOM_LOG_LEVEL", ""},
	{"amqp-url", "AMQP_URL", "URL"},
	{"name", "MAILROOM_NAME", "Name"},
	{"batch-size", "MAILROOM_BATCH_SIZE", "BatchSize"},
	{"confirm-window", "MAILROOM_CONFIRM_WINDOW", "ConfirmWindow"},
	{"active-relays", "MAILROOM_ACTIVE_RELAYS", "ActiveRelays"},
	{"max-message-size", "MAILROOM_MAX_MESSAGE_SIZE", "MaxMessageSize"},
	{"max-attempts", "MAILROOM_MAX_ATTEMPTS", "MaxAttempts"},
	{"poll-interval", "MAILROOM_POLL_INTERVAL", "PollInterval"},
	{"lease", "MAILROOM_LEASE", "Lease"},
	{"confirm-timeout", "MAILROOM_CONFIRM_TIMEOUT", "ConfirmTimeout"},
	{"min-backoff", "MAILROOM_MIN_BACKOFF", "MinBackoff"},
	{"max-backoff", "MAILROOM_MAX_BACKOFF", "MaxBackoff"},
	{"retain", "MAILROOM_RETAIN", "Retain"},
	{"no-listen", "MAILROOM_NO_LISTEN", "DisableListen"},
	{"cloudevents-source", "MAILROOM_CLOUDEVENTS_SOURCE", "CloudEvents.Source"},
	{"cloudevents-prefix", "MAILROOM_CLOUDEVENTS_PREFIX", "CloudEvents.Prefix"},
	{"http", "MAILROOM_HTTP", ""},
	{"admin-token", "MAILROOM_ADMIN_TOKEN", ""},
	{"stall-timeout", "MAILROOM_STALL_TIMEOUT", ""},
	{"sample-interval", "MAILROOM_SAMPLE_INTERVAL", ""},
	{"horizon-warn", "MAILROOM_HORIZON_WARN", ""},
	{"maintenance-interval", "MAILROOM_MAINTENANCE_INTERVAL", ""},
	{"maintenance-timeout", "MAILROOM_MAINTENANCE_TIMEOUT", ""},
	{"purge-inbox", "MAILROOM_PURGE_INBOX", ""},
	{"dedupe-retention", "MAILROOM_DEDUPE_RETENTION", ""},
	{"purge-batch", "MAILROOM_PURGE_BATCH", ""},
}

// overridden reports whether a flag given on fs's command line overrides
// the environment variable env.
func overridden(fs *flag.FlagSet, env string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) {
		for _, s := range settings {
			if s.flag == f.Name && s.env == env {
				given = true
			}
		}
	})
	return given
}

var configField = regexp.MustCompile(`\b(?:(?:relay|mailroom): )*Config\.([A-Za-z.]+)|\bmailroom: (Tables\.[A-Za-z]+)`)

// namedForUser rewrites the library's "relay: Config.BatchSize …" into the
// flag and variable a user sets: "--batch-size (MAILROOM_BATCH_SIZE) …".
func namedForUser(msg string) string {
	return configField.ReplaceAllStringFunc(msg, func(m string) string {
		sub := configField.FindStringSubmatch(m)
		field := sub[1]
		if field == "" {
			field = sub[2]
		}
		for _, s := range settings {
			if s.field == field {
				return "--" + s.flag + " (" + s.env + ")"
			}
		}
		return m
	})
}
