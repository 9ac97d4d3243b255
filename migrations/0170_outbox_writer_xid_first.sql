-- Issue 11 (the relay's floor): the outbox relay scans for unpublished rows from a floor
-- (`floor::Floor`), below which nothing can still be pending, instead of from the lowest id, so it
-- never walks the index entries of rows it published long ago (it vacuumed the outbox after every
-- burst before, at a cost that grew with the table). The floor's argument needs every writer of
-- an outbox row to hold its transaction id before the row takes its id. A transaction whose
-- first write is an INSERT INTO outbox would otherwise take the id (the column default, computed
-- with the row) and only then its transaction id (when the row is stored): a relay looking in
-- between could not tell that a transaction still running holds that id.
--
-- A BEFORE statement trigger runs before the statement computes any row, so taking the
-- transaction id there settles it for every writer: the api's and the expirer's statements, the
-- queue's group commit, scripts, and an UPDATE that gives a row a new id (`bookingctl outbox
-- retry`). Once per statement, not per row; a transaction that already has its id pays a call.
CREATE FUNCTION outbox_writer_xid_first() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_writer_xid_first BEFORE INSERT OR UPDATE ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_writer_xid_first();
