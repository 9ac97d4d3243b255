-- The delivery log of each notification (issue 15, item 6): what its last attempt got, next to
-- `attempts` and `delivery`, so operators can see why a notification is still PENDING
-- (docs/webhooks.md). Written by the worker's delivery step with every outcome.
ALTER TABLE notifications
    ADD COLUMN last_attempt_at timestamptz,
    ADD COLUMN last_status     int,
    ADD COLUMN last_error      text;
