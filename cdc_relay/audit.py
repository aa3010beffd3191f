"""``cdc-relay audit``: does what the source committed equal what the consumer applied?

The source side is the retained outbox rows (``pg_dsn``); the consumer side its inbox
(``inbox_dsn``, every id the consumer took: applied, or skipped/parked by the ordering guard).
Both are cut into windows by the row's ``created_at`` (the envelope's ``occurred_at``, which the
inbox keeps), so an event falls in the same window on both sides. Only events the consumer
*applied* count: one it took but skipped or parked (its ordering guard found something newer
applied for the aggregate, as for a replay with ``ordering_policy = skip``) is missing, and the
report says it was held. Per window the two sides are
compared by count and by an order-independent hash of the ids (the XOR of the first 64 bits of
each id's MD5), computed in each database; only windows that differ are read id by id, to name
the missing and the unexpected ones. The newest ``settle`` seconds are left out: those events
may still be in flight.

``--repair`` re-publishes the missing ids through ``replay`` (same message ids; the consumer's
inbox makes that safe), waits for the consumer to take them, and audits again.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from cdc_relay import catalog
from cdc_relay.config import Config, redact
from cdc_relay.errors import ConnectionLost, SetupError
from cdc_relay.postgres import connect_failure

_HASH = "bit_xor(('x' || substr(md5({id}::text), 1, 16))::bit(64)::bigint)"


@dataclass(frozen=True, slots=True)
class Window:
    start: dt.datetime
    source_count: int
    inbox_count: int
    missing: tuple[str, ...] = ()  # committed at the source, not applied by the consumer
    unexpected: tuple[str, ...] = ()  # applied by the consumer, not (or no longer) at the source
    held: tuple[str, ...] = ()  # of the missing: taken, but skipped or parked by the guard

    @property
    def agrees(self) -> bool:
        return not self.missing and not self.unexpected and self.source_count == self.inbox_count


@dataclass(frozen=True, slots=True)
class Report:
    since: dt.datetime
    until: dt.datetime
    window: dt.timedelta
    windows: tuple[Window, ...] = field(default_factory=tuple)

    @property
    def drift(self) -> tuple[Window, ...]:
        return tuple(w for w in self.windows if not w.agrees)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(i for w in self.drift for i in w.missing)


def _inbox(cfg: Config) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(cfg.inbox_dsn, autocommit=True, application_name="cdc-relay-audit")
    except psycopg.OperationalError as exc:
        raise connect_failure(redact(str(exc)).strip(), replication=False) from None


def audit(
    cfg: Config,
    since: dt.datetime,
    until: dt.datetime | None,
    window: dt.timedelta,
    settle: dt.timedelta,
) -> Report:
    seconds = window.total_seconds()
    if seconds <= 0:
        raise SetupError("--window must be longer than 0 s")
    with catalog.connect(cfg) as source, catalog.sql_errors(cfg, "auditing the outbox"):
        row = source.execute("SELECT now() - %s::interval", (settle,)).fetchone()
        assert row is not None and isinstance(row[0], dt.datetime)
        end = min(until, row[0]) if until is not None else row[0]
        source_sums: dict[int, tuple[int, int]] = {}
        for schema, name in cfg.tables:
            created, ident = _columns(source, cfg, schema, name)
            for win, count, digest in source.execute(
                sql.SQL(
                    "SELECT floor(extract(epoch FROM {c}) / %(w)s)::bigint, count(*), "
                    + _HASH
                    + " FROM {t} WHERE {c} >= %(since)s AND {c} < %(end)s GROUP BY 1"
                ).format(c=created, t=sql.Identifier(schema, name), id=ident),
                {"w": seconds, "since": since, "end": end},
            ):
                n, h = source_sums.get(int(str(win)), (0, 0))
                source_sums[int(str(win))] = (n + int(str(count)), h ^ int(str(digest)))
        with _inbox(cfg) as inbox:
            try:
                inbox_sums = {
                    int(str(win)): (int(str(count)), int(str(digest)))
                    for win, count, digest in inbox.execute(
                        sql.SQL(
                            "SELECT floor(extract(epoch FROM occurred_at) / %(w)s)::bigint, "
                            "count(*), "
                            + _HASH
                            + " FROM cdc_relay_inbox WHERE outcome = 'applied' "
                            "AND occurred_at >= %(since)s AND occurred_at < %(end)s GROUP BY 1"
                        ).format(id=sql.Identifier("id")),
                        {"w": seconds, "since": since, "end": end},
                    )
                }
            except psycopg.errors.UndefinedTable:
                raise SetupError(
                    "inbox_dsn has no cdc_relay_inbox table: point it at the consumer's database"
                ) from None
            except psycopg.Error as exc:
                raise ConnectionLost(f"reading the inbox failed: {exc}") from None
            windows = []
            for win in sorted(set(source_sums) | set(inbox_sums)):
                s_n, s_h = source_sums.get(win, (0, 0))
                i_n, i_h = inbox_sums.get(win, (0, 0))
                start = dt.datetime.fromtimestamp(win * seconds, dt.UTC)
                if (s_n, s_h) == (i_n, i_h):
                    windows.append(Window(start, s_n, i_n))
                    continue
                lo, hi = max(start, since), min(start + window, end)
                at_source = _source_ids(source, cfg, lo, hi)
                taken = {
                    str(r[0]): str(r[1])
                    for r in inbox.execute(
                        "SELECT id, outcome FROM cdc_relay_inbox "
                        "WHERE occurred_at >= %s AND occurred_at < %s",
                        (lo, hi),
                    )
                }
                at_inbox = {i for i, outcome in taken.items() if outcome == "applied"}
                missing = tuple(sorted(at_source - at_inbox))
                windows.append(
                    Window(
                        start,
                        s_n,
                        i_n,
                        missing,
                        tuple(sorted(at_inbox - at_source)),
                        tuple(i for i in missing if i in taken),
                    )
                )
    return Report(since, end, window, tuple(windows))


def _columns(
    conn: catalog.Conn, cfg: Config, schema: str, name: str
) -> tuple[sql.Identifier, sql.Identifier]:
    have = catalog.table_columns(conn, schema, name)
    created = next((c for c in cfg.columns("created_at") if c in have), None)
    if created is None:
        raise SetupError(
            f"outbox table {schema}.{name} has no created_at column: the audit cuts both sides "
            "into windows by it"
        )
    ident = next(c for c in cfg.columns("id") if c in have)
    return sql.Identifier(created), sql.Identifier(ident)


def _source_ids(conn: catalog.Conn, cfg: Config, lo: dt.datetime, hi: dt.datetime) -> set[str]:
    out: set[str] = set()
    for schema, name in cfg.tables:
        created, ident = _columns(conn, cfg, schema, name)
        rows = conn.execute(
            sql.SQL("SELECT {i}::text FROM {t} WHERE {c} >= %s AND {c} < %s").format(
                i=ident, t=sql.Identifier(schema, name), c=created
            ),
            (lo, hi),
        )
        out |= {str(r[0]) for r in rows}
    return out


def wait_taken(cfg: Config, ids: tuple[str, ...], timeout: float) -> bool:
    """Wait until the consumer took every id (applied, skipped or parked); False on timeout."""
    deadline = time.monotonic() + timeout
    with _inbox(cfg) as inbox:
        while True:
            row = inbox.execute(
                "SELECT count(*) FROM cdc_relay_inbox WHERE id = ANY(%s)", (list(ids),)
            ).fetchone()
            if row is not None and int(str(row[0])) >= len(ids):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
