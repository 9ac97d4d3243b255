-- Outbox rows Kafka refuses for good (message too large, unknown topic…) are set aside instead
-- of blocking every later event (issue 15 item 8). A set-aside row keeps `published_at` NULL and
-- gets `set_aside_at` (when) and `last_error` (Kafka's answer). The relay skips it; an operator
-- sends it again by clearing `set_aside_at` (`bookingctl outbox retry <id>`), or leaves it.
ALTER TABLE outbox ADD COLUMN set_aside_at timestamptz, ADD COLUMN last_error text;

-- The relay's scan: rows still to publish, in id order.
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL AND set_aside_at IS NULL;
-- The operators' list of set-aside rows, and the outbox_set_aside gauge.
CREATE INDEX outbox_set_aside ON outbox (id) WHERE set_aside_at IS NOT NULL;
