-- Issue 11: two indexes every insert still paid for and no query reads any more.

-- `outbox_unpublished (id) WHERE published_at IS NULL` was the relay's index until set-aside
-- rows came (0050): the relay now reads `outbox_pending` (unpublished and not set aside), and
-- operators' set-aside queries read `outbox_set_aside`. Every outbox row (two per new entrant in
-- the queue spike) paid an entry here.
DROP INDEX IF EXISTS outbox_unpublished;

-- `notifications_by_user (user_id, id)` served reads by id cursor; since 0080 a user's
-- notifications are read by stream position through `notifications_by_user_pos (user_id, pos)`.
DROP INDEX IF EXISTS notifications_by_user;
