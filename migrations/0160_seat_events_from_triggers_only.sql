-- Issue 11 (the stream feed's floor, 0150's pass): `sequencer::Floor` lets the feed look for
-- unstamped seat events only above a floor, and its argument that nothing can appear below it
-- needs every seat event to be written by the statement triggers on `reservations` (0130), after
-- the statement wrote its reservations: the writing transaction then has its transaction id
-- before it takes the seat event's id. An INSERT into seat_events by anything else (a script, a
-- later feature writing events itself) could take an id first and commit below the floor, and
-- its event would never reach a watcher. Refuse it, once per statement (no per-row cost): the
-- triggers' own inserts run at trigger depth 2, anything else at depth 1.
--
-- pg_dump and pg_restore are unaffected (triggers are restored after the data); a data-only
-- restore into an existing schema needs --disable-triggers.
CREATE FUNCTION seat_events_from_triggers_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'seat_events is written only by the triggers on reservations (see sequencer::Floor)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER seat_events_from_triggers_only BEFORE INSERT ON seat_events
    FOR EACH STATEMENT EXECUTE FUNCTION seat_events_from_triggers_only();
