-- Retention (issue 15, item 10): the worker prunes old rows in batches, oldest first. These
-- indexes let each batch find its rows without scanning the table. The columns are written once,
-- at insert, with ever-growing values, so the indexes cost little on the write path.
CREATE INDEX outbox_created_at ON outbox (created_at);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
CREATE INDEX processed_events_created_at ON processed_events (created_at);
