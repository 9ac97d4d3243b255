-- Issue 11: no NOTIFY inside booking transactions. PostgreSQL commits every transaction that sent
-- a NOTIFY under one global lock, held through its WAL flush, so these triggers made the commits
-- of holds, payments and queue entries (outbox) and of stored notifications run one at a time
-- (pgbench, 32 clients, one-row insert: 19,700 commits/s without such a trigger, 4,600 with it).
-- Wake-ups now come after the commit: in-process for the outbox relay (outbox::committed), and
-- one NOTIFY per stored batch from the worker (notification::announce_stored), outside the
-- insert's transaction. Both sides keep polling as the fallback.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
DROP TRIGGER notification_notify ON notifications;
DROP FUNCTION notification_notify();
