"""The delivery ledger (``ledger = true``): the source-side record of what the relay delivered.

Applications that delete outbox rows right after inserting them leave nothing for ``audit`` to
compare a consumer's inbox with. The ledger is that record: one row per transaction whose
events were all confirmed by the broker, with its commit LSN, commit time, event count and an
order-independent hash of its message ids (the XOR of the first 64 bits of each id's MD5, the
same hash ``audit`` computes over an inbox in SQL).

It is written off the event loop: the loop hands over ``Delivered`` values (it never waits),
and a thread inserts them in batches of up to a second. Rows are keyed by (slot, commit LSN)
and inserted with ``ON CONFLICT DO NOTHING``, so a transaction streamed again after a restart,
or confirmed twice, is counted once; ``replay`` and backfills do not write it (their events are
rows the outbox still holds). A ledger that cannot be written never stops the relay: the rows
wait in memory (up to ``BACKLOG_LIMIT``, then the oldest are dropped and counted) and the
failure is logged once per episode and exported.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import psycopg
from psycopg import sql

from cdc_relay.config import Config, redact
from cdc_relay.errors import SetupError
from cdc_relay.pipeline import Delivered
from cdc_relay.telemetry import Stats

log = logging.getLogger("cdc_relay.ledger")
_json = msgspec.json.Encoder()

TABLE = "cdc_relay_ledger"
BATCH_SECONDS = 1.0
BATCH_ROWS = 5_000
BACKLOG_LIMIT = 1_000_000  # transactions kept while the ledger cannot be written

DDL = """\
CREATE TABLE IF NOT EXISTS {table} (
    slot         text        NOT NULL,
    commit_lsn   pg_lsn      NOT NULL,
    committed_at timestamptz NOT NULL,
    events       integer     NOT NULL,
    ids_hash     bigint      NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, commit_lsn)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (committed_at);
"""


def ids_hash(ids: Iterable[str]) -> int:
    """XOR of the first 64 bits (signed) of each id's MD5: order-independent, and equal to
    ``bit_xor(('x' || substr(md5(id), 1, 16))::bit(64)::bigint)`` in PostgreSQL."""
    out = 0
    for i in ids:
        digest = hashlib.md5(i.encode(), usedforsecurity=False).digest()
        out ^= int.from_bytes(digest[:8], "big", signed=True)
    return out


@dataclass(frozen=True, slots=True)
class Row:
    commit_lsn: str
    committed_at: dt.datetime
    events: int
    ids_hash: int

    @classmethod
    def of(cls, delivered: Delivered) -> Row:
        return cls(
            str(delivered.commit_lsn),
            delivered.committed_at,
            len(delivered.ids),
            ids_hash(delivered.ids),
        )


def table(cfg: Config) -> sql.Composable:
    return sql.Identifier(cfg.outbox_schema, TABLE)


def setup(conn: psycopg.Connection[tuple[object, ...]], cfg: Config) -> None:
    """Create the ledger table beside the (first) outbox table, if missing."""
    try:
        conn.execute(
            sql.SQL(DDL)
            .format(table=table(cfg), index=sql.Identifier(f"{TABLE}_committed_at"))
            .as_string(conn)
        )
    except psycopg.errors.InsufficientPrivilege:
        raise SetupError(
            f"ledger = true, but the role may not create {cfg.outbox_schema}.{TABLE}: create it "
            f"once as the table owner (`cdc-relay init` with ledger = true), then grant INSERT "
            "on it to the relay's role"
        ) from None


class LedgerWriter:
    """The thread that writes ledger rows; ``put`` is the only call the event loop makes."""

    def __init__(self, cfg: Config, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self._queue: queue.SimpleQueue[Delivered | None] = queue.SimpleQueue()
        self._backlog: deque[Row] = deque()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="cdc-relay-ledger", daemon=True)

    def start(self) -> LedgerWriter:
        self._thread.start()
        return self

    def put(self, delivered: Delivered) -> None:
        self._queue.put(delivered)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (within ``timeout``), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._backlog:
            log.warning(
                "ledger rows not written at exit; the transactions are still confirmed",
                extra={"rows": len(self._backlog)},
            )

    def _run(self) -> None:
        closing = False
        while not closing:
            closing = self._gather()
            if self._backlog:
                self._write()
                if self._failing and not closing:
                    time.sleep(min(self.cfg.reconnect_max, 2.0))
        if self._conn is not None:
            self._conn.close()

    def _gather(self) -> bool:
        """Move what the loop handed over into the backlog, for up to a second; True at close."""
        deadline = time.monotonic() + BATCH_SECONDS
        while len(self._backlog) < BATCH_ROWS:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item is None:
                return True
            self._backlog.append(Row.of(item))
            if len(self._backlog) > BACKLOG_LIMIT:
                self._backlog.popleft()
                self.stats.ledger_dropped += 1
        return False

    def _write(self) -> None:
        rows = list(self._backlog)
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.cfg.pg_dsn, autocommit=True, application_name="cdc-relay-ledger"
                )
            for start in range(0, len(rows), BATCH_ROWS):
                chunk = rows[start : start + BATCH_ROWS]
                # one JSON document PostgreSQL unpacks: cheaper than four array parameters
                document = _json.encode(
                    [(r.commit_lsn, r.committed_at, r.events, r.ids_hash) for r in chunk]
                ).decode()
                self._conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (slot, commit_lsn, committed_at, events, ids_hash) "
                        "SELECT %s, (r->>0)::pg_lsn, (r->>1)::timestamptz, (r->>2)::int, "
                        "(r->>3)::bigint FROM jsonb_array_elements(%s::jsonb) AS r "
                        "ON CONFLICT (slot, commit_lsn) DO NOTHING"
                    ).format(table(self.cfg)),
                    (self.cfg.slot, document),
                )
                for _ in chunk:
                    self._backlog.popleft()
                self.stats.ledger_rows += len(chunk)
        except psycopg.Error as exc:
            self.stats.ledger_failures += 1
            if self._conn is not None and (self._conn.closed or self._conn.broken):
                self._conn = None
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot write the delivery ledger; rows wait in memory and are retried",
                    extra={"error": redact(str(exc)).strip(), "rows": len(self._backlog)},
                )
        else:
            if self._failing:
                self._failing = False
                log.info("delivery ledger written again")
        finally:
            self.stats.ledger_backlog = len(self._backlog)
