-- Issue 11 (the hold's round trips): a hold without a key on a seat with no stale hold, the
-- common case of a sale, is one call of this function, committed on its own: the seat limit's
-- lock, then the count, the insert and the outbox row of `reservation.created`. It was `BEGIN`
-- with the lock, the statement and `COMMIT`: three round trips, two of them only for the
-- transaction (the payment's change from four to one cut its CPU per payment by about a fifth).
--
-- Why a function: the count must read a snapshot taken after the lock was granted, so that it
-- sees every hold of this user committed before (READ COMMITTED takes a statement's snapshot when
-- it starts). In one plain statement the snapshot comes first. A VOLATILE PL/pgSQL function takes
-- a fresh snapshot for each statement in it, so the statement after `pg_advisory_xact_lock` sees
-- what the lock waited for, and the lock is held until the call's transaction ends.
--
-- `reservation::hold` calls it on both paths (the slow one, with a key or a stale hold to end,
-- inside its own transaction, which already holds the same lock: taking it again is free), so
-- the rule lives here once; `reservation.rs` says where. The status tests are written as
-- `reservation::status_is` writes them (see there), the outbox insert as `outbox::insert_sql`.
CREATE FUNCTION hold_seat(p_id uuid, p_user uuid, p_seat uuid, p_schedule uuid, p_price bigint,
                          p_ttl_us bigint, p_max_live bigint, p_lock bigint,
                          p_topics text[], p_keys text[], p_event_ids uuid[], p_envelopes jsonb[])
RETURNS TABLE (live bigint, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    -- The seat limit's lock: this user's holds in this schedule, and only those, one at a time.
    PERFORM pg_advisory_xact_lock(p_lock);
    RETURN QUERY
    WITH lim AS (SELECT count(*) AS live FROM reservations WHERE user_id = p_user AND schedule_id = p_schedule
                 AND (status IS NOT DISTINCT FROM 'CONFIRMED'
                      OR (status IS NOT DISTINCT FROM 'HELD' AND expires_at > clock_timestamp()))),
         r AS (INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
               SELECT p_id, p_user, p_seat, p_schedule, p_price, 'HELD', now(), now() + p_ttl_us * interval '1 microsecond'
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
    SELECT lim.live, r.created_at, r.expires_at FROM lim LEFT JOIN r ON true;
END $$;
