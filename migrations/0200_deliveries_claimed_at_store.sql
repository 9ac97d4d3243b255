-- Issue 11: the worker stores a batch of notifications with their delivery rows already claimed
-- by itself (`notification::store_claimed`: the statement inserts them with `next_attempt_at` a
-- lease ahead), and hands the batch to its own delivery loop. Before, every delivery row was
-- written twice: inserted due now by this trigger, then claimed by the delivery loop's UPDATE.
--
-- This trigger still gives every other insert into `notifications` its delivery rows, due at
-- once; rows the inserting statement already gave one are skipped.
CREATE OR REPLACE FUNCTION notification_deliveries_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notification_deliveries (notification_id) SELECT id FROM added
    ON CONFLICT (notification_id) DO NOTHING;
    RETURN NULL;
END $$;
