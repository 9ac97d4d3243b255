-- Schema of the booking backend. PostgreSQL is the source of truth; Redis and Kafka only carry
-- copies and signals that can be rebuilt from here.

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    -- SHA-256 of the bearer token; the token itself is never stored.
    token_hash  bytea NOT NULL UNIQUE,
    -- Points can never go negative: the CHECK is the last guard behind the conditional update.
    balance     bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE point_ledger (
    id             bigserial PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id),
    kind           text NOT NULL CHECK (kind IN ('CHARGE', 'USE', 'REFUND')),
    amount         bigint NOT NULL CHECK (amount > 0),
    balance_after  bigint NOT NULL CHECK (balance_after >= 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX point_ledger_by_user ON point_ledger (user_id, id);

-- Idempotency-Key records: the stored answer is replayed for the same key and body.
CREATE TABLE idempotency_keys (
    user_id       uuid NOT NULL REFERENCES users (id),
    scope         text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status_code   int NOT NULL,
    response      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, scope, key)
);

CREATE TABLE concerts (
    id          uuid PRIMARY KEY,
    title       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schedules (
    id                uuid PRIMARY KEY,
    concert_id        uuid NOT NULL REFERENCES concerts (id),
    starts_at         timestamptz NOT NULL,
    booking_opens_at  timestamptz NOT NULL,
    seat_count        int NOT NULL CHECK (seat_count > 0),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_by_concert ON schedules (concert_id, starts_at);

CREATE TABLE seats (
    id           uuid PRIMARY KEY,
    schedule_id  uuid NOT NULL REFERENCES schedules (id),
    seat_no      int NOT NULL,
    price        bigint NOT NULL CHECK (price >= 0),
    UNIQUE (schedule_id, seat_no)
);

CREATE TABLE reservations (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id),
    seat_id       uuid NOT NULL REFERENCES seats (id),
    schedule_id   uuid NOT NULL REFERENCES schedules (id),
    price         bigint NOT NULL,
    status        text NOT NULL CHECK (status IN ('HELD', 'CONFIRMED', 'EXPIRED', 'CANCELLED')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    expired_at    timestamptz,
    confirmed_at  timestamptz,
    cancelled_at  timestamptz
);
-- The rule "a seat has at most one HELD or CONFIRMED reservation", enforced by PostgreSQL itself.
CREATE UNIQUE INDEX reservations_one_active_per_seat
    ON reservations (seat_id) WHERE status IN ('HELD', 'CONFIRMED');
-- The sweeper's and the re-arm's range scan: only HELD rows, ordered by expiry.
CREATE INDEX reservations_held_by_expiry ON reservations (expires_at) WHERE status = 'HELD';
CREATE INDEX reservations_by_user ON reservations (user_id);
CREATE INDEX reservations_confirmed_by_schedule ON reservations (schedule_id) WHERE status = 'CONFIRMED';

CREATE TABLE payments (
    id              uuid PRIMARY KEY,
    -- One payment per reservation, whatever the Idempotency-Key.
    reservation_id  uuid NOT NULL UNIQUE REFERENCES reservations (id),
    user_id         uuid NOT NULL REFERENCES users (id),
    amount          bigint NOT NULL,
    paid_at         timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox: every event is written here in the transaction that caused it, and the
-- relay publishes it to Kafka afterwards.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL,
    message_key   text NOT NULL,
    event_id      uuid NOT NULL UNIQUE,
    envelope      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Wake the relay as soon as a row is committed (LISTEN/NOTIFY); it also polls as a fallback.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_new', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Notifications as stored by the worker, once per event id.
CREATE TABLE notifications (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    user_id      uuid NOT NULL,
    type         text NOT NULL,
    title        text NOT NULL,
    message      text NOT NULL,
    data         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivery     text NOT NULL DEFAULT 'PENDING' CHECK (delivery IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts     int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
CREATE INDEX notifications_by_user ON notifications (user_id, id);
CREATE INDEX notifications_pending ON notifications (next_attempt_at) WHERE delivery = 'PENDING';

CREATE FUNCTION notification_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notification_new', NEW.user_id::text || ':' || NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER notification_notify AFTER INSERT ON notifications
    FOR EACH ROW EXECUTE FUNCTION notification_notify();

-- Consumer-side de-duplication for effects outside PostgreSQL's own tables (ranking, export).
CREATE TABLE processed_events (
    consumer    text NOT NULL,
    event_id    uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
