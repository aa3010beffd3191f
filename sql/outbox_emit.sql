-- Table-less outbox: emit an event as a transactional logical decoding message instead of a row.
-- No table, no bloat, no cleanup; cdc-relay publishes it with the same envelope as a table row,
-- at the position of the call inside the transaction (so per-aggregate order with table rows holds).
-- Needs cdc-relay's logical_messages = true (the default) and prefix = message_prefix ('outbox').
--
--   BEGIN;
--   UPDATE orders SET status = 'placed' WHERE id = 'ORD-1001';
--   SELECT outbox_emit('order', 'ORD-1001', 'OrderPlaced', '{"total": 99.5}');
--   COMMIT;
CREATE OR REPLACE FUNCTION outbox_emit(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    headers       jsonb DEFAULT NULL,
    traceparent   text  DEFAULT NULL,
    prefix        text  DEFAULT 'outbox'
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    event_id uuid := gen_random_uuid();
    event    jsonb;
BEGIN
    IF aggregatetype IS NULL OR aggregateid IS NULL OR type IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: aggregatetype, aggregateid and type are required';
    END IF;
    event := jsonb_build_object(
        'id', event_id, 'aggregatetype', aggregatetype, 'aggregateid', aggregateid,
        'type', type, 'payload', payload);
    IF headers IS NOT NULL THEN
        event := event || jsonb_build_object('headers', headers);
    END IF;
    IF traceparent IS NOT NULL THEN
        event := event || jsonb_build_object('traceparent', traceparent);
    END IF;
    PERFORM pg_logical_emit_message(true, prefix, event::text);
    RETURN event_id;
END
$$;
