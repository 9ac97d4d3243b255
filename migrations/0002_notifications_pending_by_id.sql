-- The delivery loop takes the oldest pending notifications (`ORDER BY id LIMIT n`). With only the
-- index on next_attempt_at, PostgreSQL walks the primary key past every delivered row (measured:
-- 252,000 rows filtered, 116 ms, per step of 1,000 on a 300,000-row table), so delivery slowed
-- down as the table grew. This partial index holds the pending rows only, in delivery order.
CREATE INDEX notifications_pending_by_id ON notifications (id) WHERE delivery = 'PENDING';
DROP INDEX notifications_pending;
