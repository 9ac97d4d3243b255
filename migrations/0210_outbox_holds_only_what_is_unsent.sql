-- Issue 11 (eighteenth pass): the relay deletes a row once Kafka has acknowledged it, instead of
-- marking it published and leaving it for retention to delete three days later.
--
-- Every event of the sale is an outbox row, so each row's cost is paid by every write path (a
-- queue entry, a hold, a payment, an expiry). Marking a row published could not be a HOT update
-- (`outbox_pending` is a partial index on `published_at`): it wrote a second version of the row
-- and a new entry in each of its indexes, and retention's DELETE later found the row again
-- through `outbox_created_at`. A delete only stamps the row's header: no new version, no index
-- entry. Measured with pgbench on this machine (20-row batches, the envelope of a queue
-- notification): the relay's step 1,556-1,697 -> 2,680-3,154 per second, its WAL 332-833 -> 62-302
-- bytes per row; the inserts 4,661-5,230 -> 4,776-5,967 per second with two indexes fewer.
--
-- What it changes for operators: a published event is read from Kafka (its topics keep 7 days),
-- no longer from the outbox. Rows Kafka refused for good stay, set aside, as before.
--
-- Already-published rows have nothing left to do here.
DELETE FROM outbox WHERE published_at IS NOT NULL;
-- The relay's scan (`id >= floor AND set_aside_at IS NULL`) uses the primary key: what is left
-- in the table is what is pending or set aside.
DROP INDEX outbox_pending;
-- Only retention read it, and the outbox is no longer under retention.
DROP INDEX outbox_created_at;
ALTER TABLE outbox DROP COLUMN published_at;
-- The half-empty pages of migration 0190 were room for the published versions.
ALTER TABLE outbox RESET (fillfactor);
