-- `GET /v1/users/me/reservations` pages a user's reservations newest first by (created_at, id),
-- and the seat limit counts a user's live seats in one schedule: both read this index.
CREATE INDEX reservations_by_user_newest ON reservations (user_id, created_at DESC, id DESC);
