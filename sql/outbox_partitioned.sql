-- The outbox split by hash of the aggregate id into 4 partitions, for relays side by side
-- (README, "Scaling and high availability"). `cdc-relay init --create-outbox --partitions 4`
-- applies exactly these statements (a test keeps them equal); other counts differ only in
-- MODULUS and the number of partitions.
--
-- Writers insert into "outbox" as before; PostgreSQL puts each row in the partition of its
-- aggregate, so one aggregate's events always go through one relay. Each relay lists its
-- partitions in outbox_table (relay 0: public.outbox_p0,public.outbox_p2; relay 1:
-- public.outbox_p1,public.outbox_p3), with its own slot, publication and http_address.
-- The primary key holds the partition key, as PostgreSQL requires of a partitioned table.
CREATE TABLE IF NOT EXISTS "public"."outbox" (
    id            uuid        NOT NULL,
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    headers       jsonb,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (id, aggregateid)
) PARTITION BY HASH (aggregateid);
CREATE TABLE IF NOT EXISTS "public"."outbox_p0" PARTITION OF "public"."outbox"
    FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE IF NOT EXISTS "public"."outbox_p1" PARTITION OF "public"."outbox"
    FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE IF NOT EXISTS "public"."outbox_p2" PARTITION OF "public"."outbox"
    FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE IF NOT EXISTS "public"."outbox_p3" PARTITION OF "public"."outbox"
    FOR VALUES WITH (MODULUS 4, REMAINDER 3);
