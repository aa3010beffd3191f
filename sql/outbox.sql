-- The outbox table cdc-relay streams from (Debezium-compatible column names).
-- `cdc-relay init --create-outbox` applies exactly this statement (a test keeps them equal).
--
-- Write one row in the same transaction as the business change it describes:
--   BEGIN;
--   UPDATE inventory SET reserved = reserved + 2 WHERE sku = 'SKU-42';
--   INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
--   VALUES (gen_random_uuid(), 'inventory', 'SKU-42', 'InventoryReserved',
--           '{"sku": "SKU-42", "qty": 2, "order": "ORD-1001"}');
--   COMMIT;
-- Only the INSERT becomes an event. Deleting the row later (even in the same transaction)
-- publishes nothing, so the table can be kept empty.
-- created_at defaults to clock_timestamp(), not now(): rows of one transaction then keep their
-- insertion order when `init --backfill`, `recover` or `replay` read the table (ordered by
-- created_at, then id); now() would give them one time and leave their order to the ids.
CREATE TABLE IF NOT EXISTS "public"."outbox" (
    id            uuid        PRIMARY KEY,
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    headers       jsonb,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
