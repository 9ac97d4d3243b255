-- Issue 11 (the hold's round trips): a hold without a key, the common case of a sale, is one call
-- of this function, committed on its own: the seat's look, then the seat limit's lock, the count,
-- the insert and the outbox row of `reservation.created`. It was the look, `BEGIN` with the lock,
-- the statement and `COMMIT`: four round trips (the payment's change from four to one cut its CPU
-- per payment by about a quarter).
--
-- Why a function: the count must read a snapshot taken after the lock was granted, so that it
-- sees every hold of this user committed before (READ COMMITTED takes a statement's snapshot when
-- it starts). In one plain statement the snapshot comes first. A VOLATILE PL/pgSQL function takes
-- a fresh snapshot for each statement in it, so the statement after `pg_advisory_xact_lock` sees
-- what the lock waited for, and the lock is held until the call's transaction ends.
--
-- `reservation::hold` calls it on every path, so the rule and the seat's look live here once
-- (`reservation.rs` says where). A hold with a key, or one that must first end a stale hold,
-- opens its own transaction with the same lock, claims the key or ends the stale hold, and then
-- calls this inside it (taking the lock again is free) with `p_stop_if_taken` false: a keyed
-- retry's own earlier hold would look like someone else's, and the unique index on live
-- reservations decides anyway. The status tests are written as `reservation::status_is` writes
-- them (see there), the outbox insert as `outbox::insert_sql`.
--
-- `outcome`: 'held' (`price`, `created_at`, `expires_at` set), 'limit' (`live` seats already),
-- 'taken' (someone holds or owns the seat), 'no_seat', 'other_schedule' (the seat is not in
-- `p_schedule`, the queue token's), and, only with `p_stop_if_taken`, 'stale' (a hold past its
-- expiry still blocks the seat: nothing was done, the caller takes the slow path).
CREATE FUNCTION hold_seat(p_id uuid, p_user uuid, p_seat uuid, p_schedule uuid, p_stop_if_taken boolean,
                          p_ttl_us bigint, p_max_live bigint, p_lock bigint,
                          p_topics text[], p_keys text[], p_event_ids uuid[], p_envelopes jsonb[])
RETURNS TABLE (outcome text, live bigint, price bigint, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_schedule uuid;
    v_price bigint;
    v_taken boolean;
    v_stale boolean;
BEGIN
    -- The seat's live reservation, if any, through the live-seat index (its predicate is the
    -- join's status test). Most losers of a seat fight leave here, without any lock; the unique
    -- index on live reservations stays what decides.
    SELECT s.schedule_id, s.price,
           COALESCE(r.status = 'CONFIRMED' OR r.expires_at > now(), false),
           COALESCE(r.status = 'HELD' AND r.expires_at <= now(), false)
      INTO v_schedule, v_price, v_taken, v_stale
      FROM seats s LEFT JOIN reservations r ON r.seat_id = s.id AND r.status IN ('HELD', 'CONFIRMED')
     WHERE s.id = p_seat;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_seat'::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::timestamptz;
        RETURN;
    ELSIF v_schedule <> p_schedule THEN
        RETURN QUERY SELECT 'other_schedule'::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::timestamptz;
        RETURN;
    ELSIF p_stop_if_taken AND v_taken THEN
        RETURN QUERY SELECT 'taken'::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::timestamptz;
        RETURN;
    ELSIF p_stop_if_taken AND v_stale THEN
        RETURN QUERY SELECT 'stale'::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;

    -- The seat limit's lock: this user's holds in this schedule, and only those, one at a time.
    PERFORM pg_advisory_xact_lock(p_lock);
    RETURN QUERY
    WITH lim AS (SELECT count(*) AS live FROM reservations WHERE user_id = p_user AND schedule_id = p_schedule
                 AND (status IS NOT DISTINCT FROM 'CONFIRMED'
                      OR (status IS NOT DISTINCT FROM 'HELD' AND expires_at > clock_timestamp()))),
         r AS (INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
               SELECT p_id, p_user, p_seat, p_schedule, v_price, 'HELD', now(), now() + p_ttl_us * interval '1 microsecond'
               FROM lim WHERE lim.live < p_max_live
               ON CONFLICT (seat_id) WHERE status IN ('HELD', 'CONFIRMED') DO NOTHING
               RETURNING reservations.created_at, reservations.expires_at),
         -- PostgreSQL's clock stamps the hold, so the event's expiresAt is written here, in the
         -- RFC 3339 form chrono writes (`db::rfc3339_sql`).
         o AS (INSERT INTO outbox (topic, message_key, event_id, envelope)
               SELECT t, k, e, jsonb_set(v, '{payload,expiresAt}', to_jsonb(to_char(r.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
               FROM unnest(p_topics, p_keys, p_event_ids, p_envelopes) WITH ORDINALITY AS x(t, k, e, v, n), r
               ORDER BY n
               ON CONFLICT (event_id) DO NOTHING)
    SELECT CASE WHEN r.created_at IS NOT NULL THEN 'held' WHEN lim.live >= p_max_live THEN 'limit' ELSE 'taken' END,
           lim.live, v_price, r.created_at, r.expires_at
    FROM lim LEFT JOIN r ON true;
END $$;
