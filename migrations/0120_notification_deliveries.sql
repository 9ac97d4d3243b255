-- Issue 11: the delivery state of a notification moves out of `notifications` into a narrow table
-- of its own.
--
-- Measured in the spike (docs/bench/profile.md, pg_stat_statements): the delivery loop's outcome
-- UPDATE was a third of the bench database's time, 16 ms a statement, although the same
-- statement takes 2 ms on an idle copy. Each notification row was written four times (insert,
-- the sequencer's `pos`, the delivery claim, the outcome), every write a new version of the wide
-- row (title, message, jsonb data) under seven indexes, and the sequencer and the delivery loop
-- took row locks on the same fresh rows at the same moment.
--
-- Now `notifications` is written twice (insert, `pos`) and the delivery loop works on
-- `notification_deliveries`: one narrow row per notification, a primary key and a partial index
-- of the pending rows. The claim changes only `next_attempt_at`, which no index holds, so with
-- free room on the page (fillfactor) PostgreSQL updates it in place (a HOT update, no index
-- write).
CREATE TABLE notification_deliveries (
    notification_id bigint PRIMARY KEY,
    status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED')),
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_status     int,
    last_error      text,
    delivered_at    timestamptz
) WITH (fillfactor = 70);
CREATE INDEX notification_deliveries_pending ON notification_deliveries (notification_id) WHERE status = 'PENDING';

INSERT INTO notification_deliveries (notification_id, status, attempts, next_attempt_at, last_attempt_at, last_status, last_error, delivered_at)
SELECT id, CASE delivery WHEN 'DELIVERED' THEN 'DELIVERED' ELSE 'PENDING' END, attempts, next_attempt_at,
       last_attempt_at, last_status, last_error, delivered_at
FROM notifications;

ALTER TABLE notifications
    DROP COLUMN delivery,
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at,
    DROP COLUMN delivered_at,
    DROP COLUMN last_attempt_at,
    DROP COLUMN last_status,
    DROP COLUMN last_error;

-- Every stored notification is to be delivered, whoever inserts it (the worker, the api's payment
-- and queue transactions, the expirer): one statement-level trigger adds the delivery rows of a
-- whole insert at once, inside the inserting transaction, so a notification and its delivery row
-- commit together. Rows skipped by ON CONFLICT DO NOTHING are not in `added`.
CREATE FUNCTION notification_deliveries_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notification_deliveries (notification_id) SELECT id FROM added;
    RETURN NULL;
END $$;
CREATE TRIGGER notification_deliveries_add AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION notification_deliveries_add();
