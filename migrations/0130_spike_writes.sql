-- Issue 11, found by profiling the 10,000-holds-in-2-seconds expiry burst (pg_stat_statements and
-- EXPLAIN ANALYZE of the expirer's UPDATE): each expired hold paid a PL/pgSQL call and a one-row
-- INSERT of its own for its seat event, and an index entry in an index nothing needs.

-- `reservations_by_user_newest (user_id, created_at DESC, id DESC)` answers every lookup by user
-- (its first column), so this one only cost a write per hold, payment and expiry (an UPDATE of
-- `status` is never HOT: the column is indexed).
DROP INDEX IF EXISTS reservations_by_user;

-- Seat events: the same rows as before (one per status change of a reservation, in the changing
-- transaction, see 0080), written once per statement from its transition tables instead of once
-- per row. PostgreSQL allows transition tables only on single-event triggers without a column
-- list, hence two triggers, and the UPDATE one compares the old and new status itself.
DROP TRIGGER seat_event_capture ON reservations;
DROP FUNCTION seat_event_capture();

CREATE FUNCTION seat_event_status(reservation_status text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE reservation_status WHEN 'HELD' THEN 'HELD' WHEN 'CONFIRMED' THEN 'SOLD' ELSE 'AVAILABLE' END
$$;

CREATE FUNCTION seat_events_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seat_events (schedule_id, seat_id, status)
    SELECT schedule_id, seat_id, seat_event_status(status) FROM added;
    RETURN NULL;
END $$;
CREATE TRIGGER seat_events_on_insert AFTER INSERT ON reservations
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION seat_events_on_insert();

CREATE FUNCTION seat_events_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seat_events (schedule_id, seat_id, status)
    SELECT n.schedule_id, n.seat_id, seat_event_status(n.status)
    FROM changed_to n JOIN changed_from o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status;
    RETURN NULL;
END $$;
CREATE TRIGGER seat_events_on_update AFTER UPDATE ON reservations
    REFERENCING OLD TABLE AS changed_from NEW TABLE AS changed_to
    FOR EACH STATEMENT EXECUTE FUNCTION seat_events_on_update();
