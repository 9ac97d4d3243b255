-- Commit-ordered positions for the live streams (issue 17) and the live seat map (issue 13).
--
-- A `bigserial` is handed out when a row is inserted, not when it becomes visible: a transaction
-- that took id 100 can commit after the one that took 101, and a reader that moved past 101 never
-- sees 100. So what a stream serves is a *position* stamped after commit by a single sequencer
-- (`crate::sequencer`): one stamping transaction at a time (the row lock on `stream_heads`), each
-- giving the already-committed, not-yet-stamped rows the next positions. Stamping transactions
-- commit one after another, so the stamped rows a reader can see always form a prefix of the
-- positions: nothing ever appears below a position someone has already read.

CREATE TABLE stream_heads (
    stream       text PRIMARY KEY,
    -- The last position stamped; updated only by the stamping transaction holding this row.
    pos          bigint NOT NULL,
    -- Positions up to here may have been pruned: a resume from before it gets a reset.
    pruned_upto  bigint NOT NULL DEFAULT 0
);

-- Seat changes, one row per reservation status change, written by the trigger below in the
-- transaction that made the change: every cause (hold, payment, cancellation, expiry by the
-- expirer, the sweeper or a stale hold taken over, refund, and whatever comes later) is captured
-- without each code path remembering to.
CREATE TABLE seat_events (
    -- Insertion order only; never served to a client.
    id           bigserial PRIMARY KEY,
    -- The commit-ordered position, NULL until the sequencer stamps it.
    pos          bigint UNIQUE,
    schedule_id  uuid NOT NULL,
    seat_id      uuid NOT NULL,
    status       text NOT NULL CHECK (status IN ('AVAILABLE', 'HELD', 'SOLD')),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX seat_events_unstamped ON seat_events (id) WHERE pos IS NULL;
CREATE INDEX seat_events_by_schedule ON seat_events (schedule_id, pos) WHERE pos IS NOT NULL;

-- Each seat's status as of `stream_heads.pos` for 'seat', maintained by the stamping
-- transaction: a snapshot read in one statement with the head is exactly the state at that
-- position (the reservations table itself runs ahead of the stamped events).
CREATE TABLE seat_state (
    seat_id      uuid PRIMARY KEY,
    schedule_id  uuid NOT NULL,
    status       text NOT NULL CHECK (status IN ('AVAILABLE', 'HELD', 'SOLD')),
    pos          bigint NOT NULL
);
CREATE INDEX seat_state_by_schedule ON seat_state (schedule_id);

INSERT INTO stream_heads (stream, pos) VALUES ('seat', 0);
INSERT INTO seat_state (seat_id, schedule_id, status, pos)
SELECT seat_id, schedule_id, CASE status WHEN 'CONFIRMED' THEN 'SOLD' ELSE 'HELD' END, 0
FROM reservations WHERE status IN ('HELD', 'CONFIRMED');

-- No NOTIFY here: NOTIFY takes a cluster-wide lock at commit and would serialize every booking.
CREATE FUNCTION seat_event_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status IS NOT DISTINCT FROM NEW.status THEN
        RETURN NULL;
    END IF;
    INSERT INTO seat_events (schedule_id, seat_id, status)
    VALUES (NEW.schedule_id, NEW.seat_id,
            CASE NEW.status WHEN 'HELD' THEN 'HELD' WHEN 'CONFIRMED' THEN 'SOLD' ELSE 'AVAILABLE' END);
    RETURN NULL;
END $$;
CREATE TRIGGER seat_event_capture AFTER INSERT OR UPDATE OF status ON reservations
    FOR EACH ROW EXECUTE FUNCTION seat_event_capture();

-- Notifications: the stream ids and the list cursor are positions too. Existing rows keep their
-- id as position, so cursors handed out before this migration stay valid.
ALTER TABLE notifications ADD COLUMN pos bigint UNIQUE;
UPDATE notifications SET pos = id;
INSERT INTO stream_heads (stream, pos) SELECT 'notification', COALESCE(max(id), 0) FROM notifications;
CREATE INDEX notifications_unstamped ON notifications (id) WHERE pos IS NULL;
CREATE INDEX notifications_by_user_pos ON notifications (user_id, pos) WHERE pos IS NOT NULL;
