-- bookingctl (src/ops): what operators did, and which dead letters were replayed.

-- Every dead letter bookingctl put back on its source topic, keyed by where it sits in the
-- dead-letter topic, so `dlq replay` never replays one message twice unless told to (--force).
CREATE TABLE dlq_replays (
    dlq_topic         text        NOT NULL,
    dlq_partition     integer     NOT NULL,
    dlq_offset        bigint      NOT NULL,
    target_topic      text        NOT NULL,
    replay_count      integer     NOT NULL DEFAULT 0,
    first_replayed_at timestamptz NOT NULL DEFAULT now(),
    last_replayed_at  timestamptz NOT NULL DEFAULT now(),
    last_replayed_by  text        NOT NULL,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);

-- One row per bookingctl command that changed something: who ran it, and what changed.
CREATE TABLE ops_audit (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL,
    command text        NOT NULL,
    detail  jsonb       NOT NULL
);
