-- Refunds (issue 13): a CONFIRMED reservation can become REFUNDED. The partial unique index
-- `reservations_one_active_per_seat` counts only HELD and CONFIRMED rows, so the same UPDATE that
-- refunds a reservation frees its seat for the next buyer.
ALTER TABLE reservations DROP CONSTRAINT reservations_status_check;
ALTER TABLE reservations ADD CONSTRAINT reservations_status_check
    CHECK (status IN ('HELD', 'CONFIRMED', 'EXPIRED', 'CANCELLED', 'REFUNDED'));
ALTER TABLE reservations ADD COLUMN refunded_at timestamptz;
