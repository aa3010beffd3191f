"""Backfill and lost-slot recovery: publish the rows a new slot will never stream, then stream.

A slot streams what commits after it exists. Rows committed before (an outbox that predates
the relay, or everything since a lost slot's last confirmed event) are read from the table in
the snapshot the slot was created with (``CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')``): that
snapshot holds exactly the rows committed before the slot's first change, so a row is either in
it (published by the backfill) or in the slot (streamed after it), never both, never neither.

**Crash safety.** Before the slot exists, a line in the publication's comment says a backfill
of it is pending; it is updated every few seconds with the key ``(created_at, id)`` of the
newest row the broker has confirmed (every earlier row confirmed too), and removed when the
last row is confirmed. ``run`` and ``init --backfill`` refuse to stream a slot with a pending
backfill: they finish the backfill first. A restart cannot import the old snapshot (it died
with its connection), so it continues in a fresh snapshot after the recorded key. That is
still complete: every row of the old snapshot after the key is in the new one (unless it was
deleted, see the README), and rows the new snapshot holds that the old one did not were
committed after the slot, so the slot streams them anyway; those are sent twice, with the same
message id, which is the "duplicates only after a crash" the contract allows. The slot is never
dropped, so rows deleted in their own transaction (the insert-then-delete pattern) stay safe
in the slot the whole time.

Only one backfill of a slot runs at a time: it holds a session advisory lock, and a second
process (a ``run`` restarted by its supervisor meanwhile) waits as a standby.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import psycopg
from psycopg import sql

from cdc_relay import catalog
from cdc_relay.config import Config
from cdc_relay.confirms import ConfirmedPublisher
from cdc_relay.errors import SetupError, SlotBusy
from cdc_relay.lsn import Lsn
from cdc_relay.postgres import ReplicationStream
from cdc_relay.retained import (
    Key,
    OutboxTable,
    RowReader,
    Selection,
    commit_timestamps,
    message,
)
from cdc_relay.retained import builder as retained_builder
from cdc_relay.signals import StopSignal

log = logging.getLogger("cdc_relay.backfill")

CHECKPOINT_INTERVAL = 2.0  # seconds between records of the confirmed key
_PREFIX = "cdc-relay: backfill of slot "


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    """A backfill that has not finished, as recorded in the publication's comment.

    ``at`` is the slot's consistent point (None until the slot exists); ``table`` the outbox
    table being read (earlier ones are done); ``after`` the key of the newest row confirmed in
    it; ``since`` the lower time bound of a recovery (None: every row).
    """

    slot: str
    at: str | None = None
    since: dt.datetime | None = None
    table: str | None = None
    after: tuple[str | None, str | None] | None = None
    rows: int = 0
    started: dt.datetime | None = None


_decoder = msgspec.json.Decoder(Pending)


def parse_pending(comment: str | None) -> dict[str, Pending]:
    """Every pending backfill in a publication comment, by slot; other lines are ignored."""
    found: dict[str, Pending] = {}
    for raw in (comment or "").splitlines():
        line = raw.strip()
        if line.startswith(_PREFIX):
            _slot, _, body = line[len(_PREFIX) :].partition(" ")
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                pending = _decoder.decode(body)
                found[pending.slot] = pending
    return found


def with_pending(comment: str | None, slot: str, pending: Pending | None) -> str:
    """The comment with ``slot``'s backfill line replaced by ``pending`` (None: removed)."""
    lines = [
        raw
        for raw in (comment or "").splitlines()
        if not raw.strip().startswith(f"{_PREFIX}{slot} ")
    ]
    if pending is not None:
        # ASCII only: an id may hold any character, and a comment is read line by line
        body = json.dumps(msgspec.to_builtins(pending), ensure_ascii=True, separators=(",", ":"))
        lines.append(f"{_PREFIX}{slot} {body}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a backfill is: rows confirmed of ``total`` (the count when it started)."""

    rows: int
    total: int
    table: str
    elapsed: float


@dataclass(frozen=True, slots=True)
class Result:
    rows: int
    complete: bool  # False: stopped by a signal; the pending record says where to continue
    at: Lsn
    since: dt.datetime | None
    lines: tuple[str, ...]


OnProgress = Callable[[Progress], None]


# -- entry points ----------------------------------------------------------------------------------
def start(
    cfg: Config,
    *,
    create_outbox: bool = False,
    stop: StopSignal | None = None,
    progress: OnProgress | None = None,
) -> Result | None:
    """``init --backfill``: create what is missing, the slot with a backfill, or finish a
    pending one. None: the slot existed with no backfill pending (nothing to do)."""
    with _locked(cfg) as conn:
        if parse_pending(catalog.publication_comment(conn, cfg.publication)).get(cfg.slot):
            return _resume(cfg, conn, stop, progress)
        if catalog.slot_exists(conn, cfg.slot):
            catalog.init(cfg, create_outbox, slot=False)
            return None
        done = catalog.init(cfg, create_outbox, slot=False)
        return _fresh(cfg, conn, None, stop, progress, done)


def before_streaming(
    cfg: Config, *, allow_create: bool, stop: StopSignal | None, progress: OnProgress | None
) -> Result | None:
    """``run``: finish a pending backfill; with ``create_slot`` and ``backfill`` on, create a
    missing slot with one. None when there was nothing to backfill."""
    with catalog.connect(cfg) as probe, catalog.sql_errors(cfg, "looking for a backfill"):
        pending = parse_pending(catalog.publication_comment(probe, cfg.publication)).get(cfg.slot)
        missing = not catalog.slot_exists(probe, cfg.slot)
    if pending is None and not (allow_create and cfg.backfill and missing):
        return None
    with _locked(cfg) as conn:
        if parse_pending(catalog.publication_comment(conn, cfg.publication)).get(cfg.slot):
            return _resume(cfg, conn, stop, progress)
        if not catalog.slot_exists(conn, cfg.slot):
            catalog.check_not_vanished(conn, cfg)  # never replace a lost slot on its own
            done = catalog.init(cfg, create_outbox=False, deliberate=False, slot=False)
            return _fresh(cfg, conn, None, stop, progress, done)
    return None


def recover(
    cfg: Config,
    since: dt.datetime,
    *,
    stop: StopSignal | None = None,
    progress: OnProgress | None = None,
) -> Result:
    """``recover --since``: replace a lost (or missing) slot, publishing every retained row of
    time ``since`` or later that the new slot will not stream."""
    with _locked(cfg) as conn:
        pending = parse_pending(catalog.publication_comment(conn, cfg.publication)).get(cfg.slot)
        if pending is not None:
            if pending.since != since:
                raise SetupError(
                    f"a backfill of slot {cfg.slot} is pending "
                    f"({'since ' + pending.since.isoformat() if pending.since else 'every row'})"
                    f": finish it with `cdc-relay recover --since "
                    f"{pending.since.isoformat() if pending.since else '...'}` or `cdc-relay "
                    "run` before recovering from another time",
                    slot=cfg.slot,
                )
            return _resume(cfg, conn, stop, progress)
        done: list[str] = []
        row = conn.execute(
            "SELECT wal_status, active, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (cfg.slot,),
        ).fetchone()
        if row is not None:
            wal_status, active, pid = row
            if wal_status != "lost":
                raise SetupError(
                    f"slot {cfg.slot} is not lost (wal_status = {wal_status}): it still holds "
                    "every event it has not relayed, so there is nothing to recover; to send "
                    "retained rows again use `cdc-relay replay`",
                    slot=cfg.slot,
                )
            if active:
                raise SlotBusy(f"slot {cfg.slot} is in use by pid {pid}", slot=cfg.slot)
            conn.execute("SELECT pg_drop_replication_slot(%s)", (cfg.slot,))
            done.append(f"dropped invalidated slot {cfg.slot}")
        done += catalog.init(cfg, create_outbox=False, slot=False)
        return _fresh(cfg, conn, since, stop, progress, done)


def suggested_since(cfg: Config) -> tuple[dt.datetime, str] | None:
    """What the publication's comment suggests for ``recover --since`` (see catalog)."""
    with catalog.connect(cfg) as conn, catalog.sql_errors(cfg, "reading the publication"):
        found = catalog.suggested_since(
            catalog.publication_comment(conn, cfg.publication), cfg.slot
        )
    return None if found is None else (found[0].astimezone(dt.UTC), found[1])


def pending(cfg: Config) -> Pending | None:
    with catalog.connect(cfg) as conn, catalog.sql_errors(cfg, "looking for a backfill"):
        return parse_pending(catalog.publication_comment(conn, cfg.publication)).get(cfg.slot)


# -- the two ways in -------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[catalog.Conn]:
    """An admin connection holding the slot's backfill lock (SlotBusy if another holds it)."""
    with catalog.connect(cfg) as conn, catalog.sql_errors(cfg, "backfilling"):
        catalog.check_server(conn)
        catalog.check_encoding(conn)
        key = f"cdc-relay backfill {cfg.slot}"
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
        if not (row and row[0]):
            holder = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objid = hashtext(%s)::oid LIMIT 1",
                (key,),
            ).fetchone()
            raise SlotBusy(
                f"a backfill of slot {cfg.slot} is running in another connection"
                + (f" (pid {holder[0]})" if holder else "")
                + "; waiting until it ends",
                slot=cfg.slot,
            )
        yield conn


def _record(
    conn: catalog.Conn,
    cfg: Config,
    state: Pending | None,
    marker: catalog.SlotMarker | None = None,
) -> None:
    """Write the backfill line (and the slot's marker); refusing is fatal here: without the
    record, a crash would let ``run`` stream past rows the backfill had not sent."""

    def edit(comment: str | None) -> str:
        if marker is not None:
            comment = catalog.with_marker(comment, marker)
        return with_pending(comment, cfg.slot, state)

    refused = catalog.update_comment(conn, cfg, edit)
    if refused is not None:
        raise SetupError(
            f"cannot record the backfill's progress in the comment of publication "
            f"{cfg.publication} ({refused}): a backfill needs it to continue safely after a "
            "crash; run it as the publication's owner (or give the relay's role ownership)",
            slot=cfg.slot,
            publication=cfg.publication,
        )


def _fresh(
    cfg: Config,
    conn: catalog.Conn,
    since: dt.datetime | None,
    stop: StopSignal | None,
    progress: OnProgress | None,
    done: list[str],
) -> Result:
    """Create the slot with an exported snapshot and publish the rows in that snapshot."""
    state = Pending(slot=cfg.slot, since=since, started=_now(conn))
    _record(conn, cfg, state)  # before the slot exists: a crash from here on is seen
    stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
    try:
        stream.connect()
        try:
            at, snapshot = stream.create_exported_slot()
        except BaseException:
            with contextlib.suppress(Exception):
                _record(conn, cfg, None)  # no slot: nothing is pending
            raise
        marker = catalog.slot_marker(conn, cfg, str(at), "created")
        state = msgspec.structs.replace(state, at=str(at))
        _record(conn, cfg, state, marker)
        done = [*done, f"created slot {cfg.slot} at {at} with an exported snapshot"]
        reader = _reader(cfg)
        with catalog.sql_errors(cfg, "importing the slot's snapshot"):
            reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    finally:
        stream.close()  # the snapshot lives on in the reader's transaction
    with reader:
        return _publish(cfg, conn, reader, state, at, stop, progress, done)


def _resume(
    cfg: Config, conn: catalog.Conn, stop: StopSignal | None, progress: OnProgress | None
) -> Result:
    """Continue a pending backfill in a fresh snapshot, after the last confirmed key."""
    state = parse_pending(catalog.publication_comment(conn, cfg.publication))[cfg.slot]
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (cfg.slot,),
    ).fetchone()
    if row is None:
        if state.at is None:  # it died before the slot was made: start over
            _record(conn, cfg, None)
            return _fresh(cfg, conn, state.since, stop, progress, [])
        catalog.check_not_vanished(conn, cfg)
        raise SetupError(f"slot {cfg.slot} of a pending backfill does not exist", slot=cfg.slot)
    if row[1] == "lost":
        raise SetupError(
            f"slot {cfg.slot} was invalidated during its backfill: run `cdc-relay recover "
            f"--since {state.since.isoformat() if state.since else '<time>'}`",
            slot=cfg.slot,
        )
    at = Lsn.parse(state.at or str(row[0]))
    log.info(
        "continuing backfill",
        extra={"slot": cfg.slot, "table": state.table, "rows_before": state.rows},
    )
    reader = _reader(cfg)
    with reader:
        return _publish(cfg, conn, reader, state, at, stop, progress, [])


def _reader(cfg: Config) -> catalog.Conn:
    """A connection for one REPEATABLE READ, READ ONLY transaction: one consistent view."""
    conn = catalog.connect(cfg)
    conn.autocommit = False
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def _now(conn: catalog.Conn) -> dt.datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None and isinstance(row[0], dt.datetime)
    return row[0]


# -- reading and publishing ------------------------------------------------------------------------
def _publish(
    cfg: Config,
    conn: catalog.Conn,
    reader: catalog.Conn,
    state: Pending,
    at: Lsn,
    stop: StopSignal | None,
    progress: OnProgress | None,
    done: list[str],
) -> Result:
    selection = Selection(since=state.since)
    commit_times = commit_timestamps(conn)
    tables = [OutboxTable(conn, cfg, s, n) for s, n in cfg.tables]
    if state.table is not None:
        names = [t.display for t in tables]
        if state.table in names:
            tables = tables[names.index(state.table) :]
    total = _count(reader, tables, selection, state, commit_times) + state.rows
    database = str(conn.info.dbname)
    started = time.monotonic()
    rows_before = state.rows
    with (
        catalog.sql_errors(cfg, "reading the outbox table"),
        ConfirmedPublisher[tuple[str, Key]](cfg, stop) as pub,
    ):
        builder = retained_builder(cfg, database, pub.frame_max)
        last = time.monotonic()
        for table in tables:
            after = state.after if state.table == table.display else None
            state = msgspec.structs.replace(state, table=table.display, after=after)
            for batch in RowReader(cfg, table, at).rows(reader, selection, after, commit_times):
                for row in batch:
                    out, _why = message(cfg, builder, row)
                    pub.publish(out, (table.display, row.key))
                pub.wait_room()
                now = time.monotonic()
                if now - last >= CHECKPOINT_INTERVAL:
                    last = now
                    state = _checkpoint(conn, cfg, state, pub, rows_before)
                if progress is not None:
                    progress(
                        Progress(rows_before + pub.confirmed, total, table.display, now - started)
                    )
                if stop is not None and stop.requested:
                    pub.wait_all(cfg.stop_timeout)
                    state = _checkpoint(conn, cfg, state, pub, rows_before)
                    log.info(
                        "backfill stopped; `run` or `init --backfill` continues it",
                        extra={"slot": cfg.slot, "rows": state.rows, "table": table.display},
                    )
                    return Result(state.rows, False, at, state.since, tuple(done))
            pub.wait_all()
            state = _checkpoint(conn, cfg, state, pub, rows_before)
        reader.rollback()
    _record(conn, cfg, None)
    rows = rows_before + pub.confirmed
    if progress is not None:
        progress(Progress(rows, total, "", time.monotonic() - started))
    done.append(
        f"backfilled {rows} rows into slot {cfg.slot}'s stream (snapshot at {at}"
        + (f", rows since {state.since.isoformat()}" if state.since else "")
        + "); the slot streams everything committed after it"
    )
    return Result(rows, True, at, state.since, tuple(done))


def _checkpoint(
    conn: catalog.Conn,
    cfg: Config,
    state: Pending,
    pub: ConfirmedPublisher[tuple[str, Key]],
    rows_before: int,
) -> Pending:
    """Record the confirmed prefix: the newest key of the current table that is confirmed."""
    confirmed = pub.confirmed_key
    after = state.after
    if confirmed is not None and confirmed[0] == state.table:
        after = confirmed[1]
    state = msgspec.structs.replace(state, after=after, rows=rows_before + pub.confirmed)
    with catalog.sql_errors(cfg, "recording the backfill's progress"):
        _record(conn, cfg, state)
    return state


def _count(
    reader: catalog.Conn,
    tables: list[OutboxTable],
    selection: Selection,
    state: Pending,
    commit_times: bool,
) -> int:
    total = 0
    for table in tables:
        after = state.after if state.table == table.display else None
        query, params = table.query(selection, after, commit_times)
        row = reader.execute(
            sql.SQL("SELECT count(*) FROM ({}) AS selected").format(query), params
        ).fetchone()
        total += int(str(row[0])) if row else 0
    return total
