-- Issue 11 (twenty-second pass): holds that arrive together share one statement and one commit,
-- as payments do (`group_commit`, `reservation::HoldGroup`).
--
-- `hold_seat` (migration 0180) is one call per hold. Measured with pgbench on a copy of the schema
-- (60 schedules of 10,000 seats, prepared statements), PostgreSQL spent about 300 to 450 µs of
-- CPU per hold, most of it in what every statement costs whatever its rows: the executor's start
-- over the five indexes of `reservations` and the outbox's, the statement triggers (the seat
-- event, the outbox's transaction id), the foreign-key checks' setup and the commit. This function
-- writes many holds in one call: 110 µs per hold in calls of 8, 80 µs in calls of 16.
--
-- Every rule of `hold_seat` holds hold by hold:
-- - the seat's look first, without any lock: a seat that does not exist, is in another schedule,
--   or is held or sold answers as `hold_seat` does ('no_seat', 'other_schedule', 'taken'), and
--   one blocked by a hold past its expiry answers 'stale' (the caller ends it on the slow path);
-- - then the seat limit's lock of every hold still in the running, taken in the order of the
--   locks' values, so two groups never wait on each other in a cycle;
-- - then, in a statement whose snapshot comes after every lock was granted, each hold's count of
--   its user's live seats in its schedule, the insert of those under the limit, and their outbox
--   rows of `reservation.created` with PostgreSQL's `expiresAt`. The unique index on live
--   reservations decides a seat: 'taken' when it refused the row.
--
-- The caller never puts two holds of one user in one schedule, or two holds of one seat, in one
-- call (`HoldAsk::exclusive`): the count would not see the other, and the seat's insert would
-- wait on itself. The rows are inserted in the seats' order, so two calls inserting the same two
-- seats (a seat fight across api processes) wait on each other in one direction only.
--
-- `plan_cache_mode = force_generic_plan`: the statements' parameters are arrays, and PostgreSQL's
-- plan cache kept planning them anew for each call (their custom plans looked cheaper): in calls
-- of 8, 8 % more CPU per call than with the generic plan (824 to 889 µs against 776).
--
-- `enable_seqscan = off`: the seat limit's count is a subquery per hold, correlated with the
-- hold's user. `hold_seat` is planned for its one user, so the statistics' most common values keep
-- it on the user's index; here the user is a column, and planned from statistics that saw one
-- user own most reservations (`tests/plans.rs` builds that case), the count read the whole table
-- for every hold. No statement of this function (nor the triggers and foreign-key checks it
-- fires) is better served by a sequential scan: each reads a few rows by a key.
--
-- `n` is the hold's place in the arrays (from 1); the rows come in that order.
CREATE FUNCTION hold_seats(p_ids uuid[], p_users uuid[], p_seats uuid[], p_schedules uuid[], p_locks bigint[],
                           p_ttl_us bigint[], p_max_live bigint[],
                           p_topics text[], p_keys text[], p_event_ids uuid[], p_envelopes jsonb[])
RETURNS TABLE (n bigint, outcome text, live bigint, price bigint, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    v_look text[];
    v_price bigint[];
    v_locks bigint[];
    v_lock bigint;
BEGIN
    -- The look, as in `hold_seat` (the status tests as `reservation::status_is` writes them).
    SELECT array_agg(l.look ORDER BY l.n), array_agg(l.price ORDER BY l.n),
           array_agg(DISTINCT l.lock ORDER BY l.lock) FILTER (WHERE l.look = 'free')
      INTO v_look, v_price, v_locks
      FROM (SELECT a.n, a.lock, s.price,
                   CASE WHEN s.id IS NULL THEN 'no_seat'
                        WHEN s.schedule_id <> a.schedule THEN 'other_schedule'
                        WHEN COALESCE(r.status = 'CONFIRMED' OR r.expires_at > now(), false) THEN 'taken'
                        WHEN COALESCE(r.status = 'HELD' AND r.expires_at <= now(), false) THEN 'stale'
                        ELSE 'free' END AS look
              FROM unnest(p_seats, p_schedules, p_locks) WITH ORDINALITY AS a(seat, schedule, lock, n)
              -- One descent of each key per hold, whatever the statistics say (`tests/plans.rs`):
              -- as joins, a plan made when no hold was live read every live hold's index entry.
              LEFT JOIN LATERAL (SELECT s.id, s.schedule_id, s.price FROM seats s WHERE s.id = a.seat LIMIT 1) s ON true
              LEFT JOIN LATERAL (SELECT r.status, r.expires_at FROM reservations r
                                 WHERE r.seat_id = a.seat AND r.status IN ('HELD', 'CONFIRMED') LIMIT 1) r ON true) l;

    -- The seat limits' locks, in one order for every caller.
    FOREACH v_lock IN ARRAY COALESCE(v_locks, '{}') LOOP
        PERFORM pg_advisory_xact_lock(v_lock);
    END LOOP;

    -- A new statement, so a new snapshot: the counts see every hold committed before the locks
    -- were granted. Each CTE carries the hold's columns along rather than joining back to the
    -- arrays (the planner guesses one row for a CTE, and such joins are nested loops).
    RETURN QUERY
    WITH a AS MATERIALIZED (
             SELECT x.id, x.user_id, x.seat, x.schedule, x.n, x.ttl_us, x.max_live,
                    v_look[x.n] AS look, v_price[x.n] AS price,
                    CASE WHEN v_look[x.n] = 'free' THEN
                        (SELECT count(*) FROM reservations r WHERE r.user_id = x.user_id AND r.schedule_id = x.schedule
                            AND (r.status IS NOT DISTINCT FROM 'CONFIRMED'
                                 OR (r.status IS NOT DISTINCT FROM 'HELD' AND r.expires_at > clock_timestamp())))
                    END AS live
             FROM unnest(p_ids, p_users, p_seats, p_schedules, p_ttl_us, p_max_live)
                  WITH ORDINALITY AS x(id, user_id, seat, schedule, ttl_us, max_live, n)),
         ins AS (INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
                 SELECT a.id, a.user_id, a.seat, a.schedule, a.price, 'HELD', now(), now() + a.ttl_us * interval '1 microsecond'
                 FROM a WHERE a.look = 'free' AND a.live < a.max_live
                 ORDER BY a.seat
                 ON CONFLICT (seat_id) WHERE status IN ('HELD', 'CONFIRMED') DO NOTHING
                 RETURNING reservations.id, reservations.created_at, reservations.expires_at),
         -- PostgreSQL's clock stamps each hold, so its event's expiresAt is written here, in the
         -- RFC 3339 form chrono writes (`db::rfc3339_sql`), as `hold_seat` does.
         o AS (INSERT INTO outbox (topic, message_key, event_id, envelope)
               SELECT p_topics[e.k], p_keys[e.k], p_event_ids[e.k],
                      jsonb_set(p_envelopes[e.k], '{payload,expiresAt}', to_jsonb(to_char(e.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
               FROM (SELECT ins.expires_at, array_position(p_ids, ins.id) AS k FROM ins) e
               ORDER BY e.k
               ON CONFLICT (event_id) DO NOTHING)
    SELECT a.n,
           CASE WHEN ins.id IS NOT NULL THEN 'held' WHEN a.look <> 'free' THEN a.look
                WHEN a.live >= a.max_live THEN 'limit' ELSE 'taken' END,
           a.live, a.price, ins.created_at, ins.expires_at
    FROM a LEFT JOIN ins ON ins.id = a.id
    ORDER BY a.n;
END $$;
