"""The events every benchmark scenario moves: one shape, made by SQL, at a chosen payload size.

All publishers in a run (cdc-relay, the polling and naive relays, the raw pika ceiling) carry the
same event: an outbox row with a JSON payload of about ``--payload`` bytes, wrapped in an
envelope-v1-shaped JSON body. Backlogs are written server-side (``INSERT ... SELECT`` inside a
``DO`` block that commits every ``txn_size`` rows), so producing a million events takes seconds,
not minutes of client round trips.

Run as a module it is the steady-load producer, a separate process so that its pacing is not
disturbed by the harness::

    python -m benchmarks.workload produce --dsn DSN --table outbox --rate 2000 --txn-size 10 \
        --seconds 10 --payload 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

import msgspec
import psycopg

OUTBOX = "outbox"  # the table cdc-relay streams (created by `cdc-relay init --create-outbox`)
POLL_OUTBOX = "poll_outbox"  # the same columns plus a commit-ish order column, for pollers
AGGREGATES = 1000

POLL_OUTBOX_DDL = f"""
CREATE TABLE IF NOT EXISTS {POLL_OUTBOX} (
    seq           bigserial   PRIMARY KEY,
    id            uuid        NOT NULL UNIQUE,
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    headers       jsonb,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

# jsonb prints keys shortest first, with ", " and ": " separators; this is what the relay embeds
_BASE_KEYS = ("pad", "qty", "seq", "sku", "order")


def pad_length(size: int) -> int:
    """Length of the ``pad`` string that makes a payload's jsonb text about ``size`` bytes."""
    sample = payload_text(123456, 0)
    return max(0, size - len(sample))


def payload_text(i: int, pad: int) -> str:
    """One payload as PostgreSQL prints the jsonb the SQL below builds (same key order)."""
    doc: dict[str, Any] = {
        "pad": "x" * pad,
        "qty": i % 5 + 1,
        "seq": i,
        "sku": f"SKU-{i % 97}",
        "order": f"ORD-{i % AGGREGATES}",
    }
    return json.dumps(doc, separators=(", ", ": "))


def _select_rows(pad: int, series: str) -> str:
    """``INSERT`` source: one outbox row per value ``i`` of ``series`` (a set-returning SQL)."""
    agg = AGGREGATES
    return (
        f"SELECT gen_random_uuid(), 'order', 'ORD-' || mod(i, {agg}), 'OrderPlaced', "
        f"jsonb_build_object('seq', i, 'order', 'ORD-' || mod(i, {agg}), "
        f"'sku', 'SKU-' || mod(i, 97), 'qty', mod(i, 5) + 1, 'pad', repeat('x', {pad})) "
        f"FROM {series} AS i"
    )


def insert_sql(table: str, pad: int, series: str) -> str:
    return f"INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload) " + _select_rows(
        pad, series
    )


def write_backlog(
    conn: psycopg.Connection[tuple[Any, ...]], table: str, n: int, txn_size: int, pad: int
) -> float:
    """Commit ``n`` events in transactions of ``txn_size`` rows; returns seconds taken.

    ``txn_size >= n`` writes one single transaction. ``conn`` must be in autocommit mode (a DO
    block can only COMMIT when it is not inside an outer transaction).
    """
    start = time.perf_counter()
    if txn_size >= n:
        conn.execute(insert_sql(table, pad, f"generate_series(0, {n - 1})"))
    else:
        batches = -(-n // txn_size)
        body = insert_sql(
            table, pad, f"generate_series(b * {txn_size}, least((b + 1) * {txn_size}, {n}) - 1)"
        )
        conn.execute(f"DO $$ BEGIN FOR b IN 0..{batches - 1} LOOP {body}; COMMIT; END LOOP; END $$")
    return time.perf_counter() - start


def average_payload(conn: psycopg.Connection[tuple[Any, ...]], table: str) -> float:
    row = conn.execute(f"SELECT avg(length(payload::text)) FROM {table}").fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


# -- the envelope the peers publish: the same shape and size as cdc-relay's envelope v1 ---------
_encoder = msgspec.json.Encoder()


def envelope(
    event_id: str,
    aggregate_id: str,
    payload: bytes,
    occurred_at: str | None,
    committed_at: str | None,
    source: dict[str, object],
) -> bytes:
    return _encoder.encode(
        {
            "v": 1,
            "id": event_id,
            "aggregate_type": "order",
            "aggregate_id": aggregate_id,
            "type": "OrderPlaced",
            "payload": msgspec.Raw(payload),
            "occurred_at": occurred_at,
            "committed_at": committed_at,
            "source": source,
        }
    )


def sample_message(
    i: int, pad: int, stamp: str = "", slot: str = "bench"
) -> tuple[str, bytes, dict[str, str]]:
    """(message_id, body, headers) of one synthetic event, as cdc-relay would publish it;
    ``stamp`` (RFC 3339) becomes ``occurred_at`` and ``committed_at``, ``slot`` the slot name
    the envelope's ``source`` carries (the relay's own, for a byte-for-byte equal size)."""
    event_id = str(uuid.uuid4())
    now = stamp or time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    lsn = f"0/{0x1500000 + i * 400:X}"
    body = envelope(
        event_id,
        f"ORD-{i % AGGREGATES}",
        payload_text(i, pad).encode(),
        now,
        now,
        {
            "lsn": lsn,
            "commit_lsn": lsn,
            "txid": 1000 + i // 10,
            "slot": slot,
            "database": "bench",
        },
    )
    headers = {
        "aggregate_type": "order",
        "aggregate_id": f"ORD-{i % AGGREGATES}",
        "source_lsn": lsn,
    }
    return event_id, body, headers


# -- steady producer ---------------------------------------------------------------------------
def produce(
    dsn: str, table: str, rate: float, txn_size: int, seconds: float, pad: int, limit: float
) -> int:
    """Commit ``txn_size``-row transactions at ``rate`` events/s for ``seconds``; print a summary.

    Transaction k is due at start + k * txn_size / rate; a late producer catches up without
    sleeping (and says how late it got), so the offered load is what was asked for.
    """
    interval = txn_size / rate
    total_txns = int(seconds * rate / txn_size)
    stmt = insert_sql(table, pad, "generate_series(%s::bigint, %s::bigint)")
    worst_lag = 0.0
    committed = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        print(json.dumps({"event": "ready", "t": time.time()}), flush=True)
        start = time.monotonic()
        for k in range(total_txns):
            due = start + k * interval
            now = time.monotonic()
            if now - start > limit:
                break
            if due > now:
                time.sleep(due - now)
            else:
                worst_lag = max(worst_lag, now - due)
            base = 1_000_000_000 + k * txn_size
            conn.execute(stmt, (base, base + txn_size - 1), prepare=True)
            committed += txn_size
        elapsed = time.monotonic() - start
    print(
        json.dumps(
            {
                "event": "done",
                "t": time.time(),
                "committed": committed,
                "transactions": committed // txn_size,
                "seconds": elapsed,
                "achieved_rate": committed / elapsed if elapsed > 0 else 0.0,
                "worst_lag_s": worst_lag,
            }
        ),
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workload")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("produce", help="commit outbox events at a fixed rate")
    p.add_argument("--dsn", required=True)
    p.add_argument("--table", default=OUTBOX, choices=[OUTBOX, POLL_OUTBOX])
    p.add_argument("--rate", type=float, default=2000.0, help="events per second")
    p.add_argument("--txn-size", type=int, default=10, help="events per transaction")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--payload", type=int, default=150, help="payload bytes (approximate)")
    p.add_argument("--max-seconds", type=float, default=300, help="hard bound, catch-up included")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 100_000 and 0 < args.seconds <= 600 and 0 < args.txn_size <= 10_000):
        parser.error("rate, seconds or txn-size out of range")
    pad = pad_length(args.payload)
    return produce(
        args.dsn, args.table, args.rate, args.txn_size, args.seconds, pad, args.max_seconds
    )


if __name__ == "__main__":
    sys.exit(main())
