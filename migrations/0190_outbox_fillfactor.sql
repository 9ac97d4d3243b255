-- Issue 11 (the outbox written twice): the relay's `UPDATE outbox SET published_at = now()`
-- wrote a second full copy of every row (its jsonb envelope included) to the WAL, as much as the
-- insert itself: 45 MB of the 188 MB the bench's spike wrote (pg_stat_statements' wal_bytes).
-- The update cannot be HOT (`outbox_pending` is a partial index on `published_at`), but when the
-- new version lands on the same page PostgreSQL logs only the bytes that differ from the old one
-- (the common prefix and suffix are left out: here everything but `published_at`). A full page
-- leaves no room, so the update went to another page with the whole tuple. Inserts now stop at
-- half a page, and the other half takes each row's published version. Only new pages follow the
-- setting; an existing outbox keeps its full pages until retention empties them.
ALTER TABLE outbox SET (fillfactor = 50);
