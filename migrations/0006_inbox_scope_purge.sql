-- mailroom schema, version 6: the inbox is purged per scope.
--
-- Each consumer (scope) purges its own entries by its own retention, so the
-- purge looks up "scope = $1 AND recorded_at < cutoff ORDER BY recorded_at".
-- On (recorded_at) alone that walks past every other scope's old entries in
-- each batch; on (scope, recorded_at) it reads exactly the batch. The index
-- on recorded_at alone has no other user and is dropped, so a claim still
-- writes two index entries, not three.
--
-- Building the index blocks claims on the inbox table until the migration
-- commits. On a large inbox, create it first without blocking, under the
-- name this file gives it (the table's name plus _scope_recorded_idx):
--   CREATE INDEX CONCURRENTLY mailroom_inbox_scope_recorded_idx ON mailroom_inbox (scope, recorded_at);
CREATE INDEX IF NOT EXISTS mailroom_inbox_scope_recorded_idx
    ON mailroom_inbox (scope, recorded_at);

-- The old index lives in the inbox table's schema, which need not be on the
-- search_path: its schema is looked up, not assumed.
DO $$
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS %I.%s',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = 'mailroom_inbox'::regclass),
        'mailroom_inbox_recorded_idx');
END $$;
