-- The inbox of a consumer built with cdc-relay's kit (`cdc-relay consume`), in the consumer's own
-- database (inbox_dsn). `cdc-relay consume --init` applies exactly these statements (a test keeps
-- them equal); the consumer also applies them at start when the tables are missing.
--
-- cdc_relay_inbox: every event id the consumer has taken, with what it did (applied, skipped as
-- older than what its aggregate already has, parked). A redelivered or replayed id finds its row
-- and is acknowledged without calling the handler: the insert and the handler's own writes commit
-- together, so "applied" and "recorded" can never disagree, whatever is killed when.
CREATE TABLE IF NOT EXISTS cdc_relay_inbox (
    id             text        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    type           text        NOT NULL,
    commit_lsn     pg_lsn      NOT NULL,
    lsn            pg_lsn      NOT NULL,
    committed_at   timestamptz NOT NULL,
    occurred_at    timestamptz,
    applied_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome        text        NOT NULL
);
-- the newest position applied per aggregate: the ordering guard
CREATE TABLE IF NOT EXISTS cdc_relay_inbox_positions (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    commit_lsn     pg_lsn NOT NULL,
    lsn            pg_lsn NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
-- events ordering_policy = park kept for an operator
CREATE TABLE IF NOT EXISTS cdc_relay_inbox_parked (
    id        text        PRIMARY KEY,
    envelope  jsonb       NOT NULL,
    reason    text        NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
