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

With ``--source ledger`` (the default when ``ledger = true``) the source side is the delivery
ledger instead (``cdc_relay.ledger``: one row per confirmed transaction, for applications that
delete outbox rows at once). Both sides are then cut by commit time (``committed_at``, which
the inbox keeps too), and a window that differs is compared transaction by transaction (the
inbox keeps each event's ``commit_lsn``): the report names the commit LSNs whose count or hash
differ. It cannot name ids (the ledger keeps only their hash) nor repair (the rows are gone).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdc_relay import catalog, ledger
from cdc_relay.config import Config, redact
from cdc_relay.errors import ConnectionLost, SetupError
from cdc_relay.lsn import Lsn
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
    transactions: tuple[TransactionDrift, ...] = ()  # --source ledger: the ones that differ

    @property
    def agrees(self) -> bool:
        return (
            not self.missing
            and not self.unexpected
            and not self.transactions
            and self.source_count == self.inbox_count
        )


@dataclass(frozen=True, slots=True)
class TransactionDrift:
    """A transaction whose events the ledger and the inbox count or hash differently."""

    commit_lsn: str
    source_count: int
    inbox_count: int


@dataclass(frozen=True, slots=True)
class Report:
    since: dt.datetime
    until: dt.datetime
    window: dt.timedelta
    windows: tuple[Window, ...] = field(default_factory=tuple)
    source: str = "outbox"

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


Sums = dict[int, tuple[int, int]]  # window number -> (events, XOR hash of their ids)
# a window that differs, read in detail: (start, lo, hi, source count, inbox count) -> Window
DrillDown = Callable[[dt.datetime, dt.datetime, dt.datetime, int, int], Window]


def audit(
    cfg: Config,
    since: dt.datetime,
    until: dt.datetime | None,
    window: dt.timedelta,
    settle: dt.timedelta,
    source_side: str = "outbox",
) -> Report:
    seconds = window.total_seconds()
    if seconds <= 0:
        raise SetupError("--window must be longer than 0 s")
    if source_side == "ledger":
        return _ledger_audit(cfg, since, until, window, settle)
    with catalog.connect(cfg) as source, catalog.sql_errors(cfg, "auditing the outbox"):
        end = _end(source, until, settle)
        params: dict[str, object] = {"w": seconds, "since": since, "end": end}
        source_sums: Sums = {}
        for schema, name in cfg.tables:
            created, ident = _columns(source, cfg, schema, name)
            for win, count, digest in source.execute(
                sql.SQL(
                    "SELECT floor(extract(epoch FROM {c}) / %(w)s)::bigint, count(*), "
                    + _HASH
                    + " FROM {t} WHERE {c} >= %(since)s AND {c} < %(end)s GROUP BY 1"
                ).format(c=created, t=sql.Identifier(schema, name), id=ident),
                params,
            ):
                n, h = source_sums.get(int(str(win)), (0, 0))
                source_sums[int(str(win))] = (n + int(str(count)), h ^ int(str(digest)))
        with _inbox(cfg) as inbox:

            def drill(
                start: dt.datetime, lo: dt.datetime, hi: dt.datetime, s_n: int, i_n: int
            ) -> Window:
                at_source = _source_ids(source, cfg, lo, hi)
                taken = {
                    str(r[0]): str(r[1])
                    for r in _inbox_rows(
                        inbox,
                        sql.SQL(
                            "SELECT id, outcome FROM cdc_relay_inbox "
                            "WHERE occurred_at >= %(lo)s AND occurred_at < %(hi)s"
                        ).format(),
                        {"lo": lo, "hi": hi},
                    )
                }
                at_inbox = {i for i, outcome in taken.items() if outcome == "applied"}
                missing = tuple(sorted(at_source - at_inbox))
                return Window(
                    start,
                    s_n,
                    i_n,
                    missing,
                    tuple(sorted(at_inbox - at_source)),
                    tuple(i for i in missing if i in taken),
                )

            windows = _compare(
                source_sums, _inbox_sums(inbox, "occurred_at", params), since, end, window, drill
            )
    return Report(since, end, window, windows)


def _inbox_sums(inbox: catalog.Conn, column: str, params: dict[str, object]) -> Sums:
    """Applied events per window of ``column``, with the same hash as the source side."""
    return {
        int(str(win)): (int(str(n)), int(str(h)))
        for win, n, h in _inbox_rows(
            inbox,
            sql.SQL(
                "SELECT floor(extract(epoch FROM {c}) / %(w)s)::bigint, count(*), "
                + _HASH
                + " FROM cdc_relay_inbox WHERE outcome = 'applied' "
                "AND {c} >= %(since)s AND {c} < %(end)s GROUP BY 1"
            ).format(c=sql.Identifier(column), id=sql.Identifier("id")),
            params,
        )
    }


def _compare(
    source: Sums,
    inbox: Sums,
    since: dt.datetime,
    end: dt.datetime,
    window: dt.timedelta,
    drill: DrillDown,
) -> tuple[Window, ...]:
    """Every window either side has, in order; only those that differ are read in detail."""
    seconds = window.total_seconds()
    windows = []
    for win in sorted(set(source) | set(inbox)):
        s_n, s_h = source.get(win, (0, 0))
        i_n, i_h = inbox.get(win, (0, 0))
        start = dt.datetime.fromtimestamp(win * seconds, dt.UTC)
        if (s_n, s_h) == (i_n, i_h):
            windows.append(Window(start, s_n, i_n))
        else:
            windows.append(drill(start, max(start, since), min(start + window, end), s_n, i_n))
    return tuple(windows)


def _end(conn: catalog.Conn, until: dt.datetime | None, settle: dt.timedelta) -> dt.datetime:
    row = conn.execute("SELECT now() - %s::interval", (settle,)).fetchone()
    assert row is not None and isinstance(row[0], dt.datetime)
    return min(until, row[0]) if until is not None else row[0]


def _inbox_rows(inbox: catalog.Conn, query: sql.Composed, params: dict[str, object]) -> list[Any]:
    try:
        return inbox.execute(query, params).fetchall()
    except psycopg.errors.UndefinedTable:
        raise SetupError(
            "inbox_dsn has no cdc_relay_inbox table: point it at the consumer's database"
        ) from None
    except psycopg.Error as exc:
        raise ConnectionLost(f"reading the inbox failed: {exc}") from None


def _ledger_audit(
    cfg: Config,
    since: dt.datetime,
    until: dt.datetime | None,
    window: dt.timedelta,
    settle: dt.timedelta,
) -> Report:
    seconds = window.total_seconds()
    ledger_table = ledger.table(cfg)
    with catalog.connect(cfg) as source, catalog.sql_errors(cfg, "auditing the ledger"):
        end = _end(source, until, settle)
        params: dict[str, object] = {"w": seconds, "since": since, "end": end, "slot": cfg.slot}
        try:
            source_sums = {
                int(str(win)): (int(str(n)), int(str(h)))
                for win, n, h in source.execute(
                    sql.SQL(
                        "SELECT floor(extract(epoch FROM committed_at) / %(w)s)::bigint, "
                        "sum(events), bit_xor(ids_hash) FROM {} WHERE slot = %(slot)s AND "
                        "committed_at >= %(since)s AND committed_at < %(end)s GROUP BY 1"
                    ).format(ledger_table),
                    params,
                )
            }
        except psycopg.errors.UndefinedTable:
            raise SetupError(
                f"there is no delivery ledger ({cfg.outbox_schema}.{ledger.TABLE}): set "
                "ledger = true on the relay (or audit the outbox rows with --source outbox)"
            ) from None
        with _inbox(cfg) as inbox:

            def drill(
                start: dt.datetime, lo: dt.datetime, hi: dt.datetime, s_n: int, i_n: int
            ) -> Window:
                span = {"lo": lo, "hi": hi, "slot": cfg.slot}
                by_source = {
                    str(c): (int(str(n)), int(str(h)))
                    for c, n, h in source.execute(
                        sql.SQL(
                            "SELECT commit_lsn::text, events, ids_hash FROM {} WHERE slot = "
                            "%(slot)s AND committed_at >= %(lo)s AND committed_at < %(hi)s"
                        ).format(ledger_table),
                        span,
                    )
                }
                by_inbox: dict[str, tuple[int, int]] = {}
                held: list[str] = []
                for c, outcome, n, h, ids in _inbox_rows(
                    inbox,
                    sql.SQL(
                        "SELECT commit_lsn::text, outcome, count(*), "
                        + _HASH
                        + ", array_agg(id ORDER BY id) FROM cdc_relay_inbox WHERE "
                        "committed_at >= %(lo)s AND committed_at < %(hi)s GROUP BY 1, 2"
                    ).format(id=sql.Identifier("id")),
                    span,
                ):
                    if outcome == "applied":
                        by_inbox[str(c)] = (int(str(n)), int(str(h)))
                    else:
                        held += [str(i) for i in ids]
                drifted = tuple(
                    TransactionDrift(c, by_source.get(c, (0, 0))[0], by_inbox.get(c, (0, 0))[0])
                    for c in sorted(set(by_source) | set(by_inbox), key=Lsn.parse)
                    if by_source.get(c) != by_inbox.get(c)
                )
                return Window(start, s_n, i_n, held=tuple(held), transactions=drifted)

            windows = _compare(
                source_sums, _inbox_sums(inbox, "committed_at", params), since, end, window, drill
            )
    return Report(since, end, window, windows, "ledger")


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


class PeriodicAudit:
    """``audit_interval`` in ``consume``: the audit of the last ``audit_lookback`` seconds, run
    in a thread every ``audit_interval`` seconds (never in the consuming loop), each report
    handed to ``on_report`` and each failure to ``on_error``."""

    def __init__(
        self,
        cfg: Config,
        on_report: Callable[[Report], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self.cfg = cfg
        self._on_report = on_report
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdc-relay-audit", daemon=True)

    def start(self) -> PeriodicAudit:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        cfg = self.cfg
        source = "ledger" if cfg.ledger else "outbox"
        while not self._stop.wait(cfg.audit_interval):
            now = dt.datetime.now(dt.UTC)
            try:
                report = audit(
                    cfg,
                    now - dt.timedelta(seconds=cfg.audit_lookback),
                    None,
                    dt.timedelta(seconds=cfg.audit_window),
                    dt.timedelta(seconds=cfg.audit_settle),
                    source,
                )
            except Exception as exc:  # noqa: BLE001 - an audit failure must not stop consuming
                self._on_error(exc)
                continue
            self._on_report(report)
