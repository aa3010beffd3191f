"""Keeping the outbox table small: ``cdc-relay prune`` deletes old rows in short batches.

Pruning cannot lose an event. The relay reads INSERTs from the WAL, which the slot retains until
the broker confirmed them, and logical decoding rebuilds each row (TOASTed values included) from
the WAL records of its own transaction, never from the table. So a row may be deleted the moment
it is committed (the delete-in-the-same-transaction pattern relies on exactly this), and a prune
running beside a flood only ever removes rows whose events are already in the WAL.

Each batch is its own short transaction that locks only the rows it deletes (``SKIP LOCKED``),
under a ``lock_timeout``, so writers and the relay never wait behind a prune, and vacuum can
reclaim the space of one batch while the next runs.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from cdc_relay import backfill, catalog
from cdc_relay.config import Config
from cdc_relay.errors import ConfigError, SetupError

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
DEFAULT_BATCH = 5000
LOCK_TIMEOUT = "5s"  # a batch that cannot get its locks gives up instead of queueing writers


def parse_duration(text: str, setting: str = "older_than") -> dt.timedelta:
    """``7d``, ``12h``, ``90m``, ``30s``, ``2w`` or a sum of them (``1d12h``)."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ConfigError(
            setting, f"not a duration (expected e.g. 7d, 12h, 90m, 30s or 1d12h): {text!r}"
        )
    return dt.timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


@dataclass(frozen=True)
class Pruned:
    """What one table's prune did: rows deleted (or, dry run, that would be) before ``cutoff``."""

    table: str
    column: str
    cutoff: dt.datetime
    rows: int
    batches: int
    dry_run: bool


def prune(
    cfg: Config,
    older_than: dt.timedelta,
    *,
    batch: int = DEFAULT_BATCH,
    dry_run: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> list[Pruned]:
    """Delete outbox rows whose created_at is older than ``older_than`` in every outbox table.

    The cutoff is fixed once, from the server's clock, at the start: a prune beside a flood
    ends instead of chasing new rows. ``progress(table, rows_so_far)`` is called per batch.
    """
    if batch < 1:
        raise ConfigError("batch", f"must be at least 1, not {batch}")
    done: list[Pruned] = []
    with catalog.connect(cfg) as conn, catalog.sql_errors(cfg, "pruning the outbox"):
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        pending = backfill.parse_pending(catalog.publication_comment(conn, cfg.publication))
        if cfg.slot in pending:
            raise SetupError(
                f"a backfill of slot {cfg.slot} is pending: it still has to read rows from the "
                "outbox table, so nothing is pruned until it has finished (`cdc-relay run` or "
                "`cdc-relay init --backfill` finishes it)",
                slot=cfg.slot,
            )
        row = conn.execute("SELECT now() - %s::interval", (older_than,)).fetchone()
        cutoff = row[0] if row is not None else None
        if not isinstance(cutoff, dt.datetime):
            raise SetupError(f"PostgreSQL returned no cutoff time for {older_than}")
        for schema, name in cfg.tables:
            table = f"{schema}.{name}"
            column = _created_at_column(conn, cfg, schema, name)
            ident = sql.Identifier(schema, name)
            col = sql.Identifier(column)
            if dry_run:
                count = conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE {} < %s").format(ident, col), (cutoff,)
                ).fetchone()
                rows = int(str(count[0])) if count else 0
                done.append(Pruned(table, column, cutoff, rows, 0, True))
                continue
            # ctid picks the batch cheaply; the repeated age test keeps a ctid that names
            # another partition's row (ctids are per partition) from deleting a young row
            delete = sql.SQL(
                "DELETE FROM {t} WHERE {c} < %(cutoff)s AND ctid = ANY(ARRAY("
                "SELECT ctid FROM {t} WHERE {c} < %(cutoff)s LIMIT %(batch)s "
                "FOR UPDATE SKIP LOCKED))"
            ).format(t=ident, c=col)
            rows = batches = 0
            while True:
                cur = conn.execute(delete, {"cutoff": cutoff, "batch": batch})
                batches += 1
                rows += max(cur.rowcount, 0)
                if progress is not None:
                    progress(table, rows)
                if cur.rowcount < batch:
                    break
            done.append(Pruned(table, column, cutoff, rows, batches, False))
    return done


def _created_at_column(conn: catalog.Conn, cfg: Config, schema: str, name: str) -> str:
    have = catalog.table_columns(conn, schema, name)
    if not have:
        raise SetupError(f"outbox table {schema}.{name} does not exist (nothing to prune)")
    for candidate in cfg.columns("created_at"):
        if candidate in have:
            return candidate
    raise SetupError(
        f"outbox table {schema}.{name} has no {' or '.join(cfg.columns('created_at'))} column: "
        "prune needs the row's creation time; add it (timestamptz NOT NULL DEFAULT "
        "clock_timestamp()) or "
        "set column_created_at to the column that holds it"
    )
