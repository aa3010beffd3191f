"""The inbox: apply each event once, in order per aggregate, in the consumer's own database.

A batch of events (what the broker has delivered so far, in delivery order) is one transaction
on the consumer's database: record every id in ``cdc_relay_inbox`` in one statement (a conflict
means the id was taken before: a redelivery or a replay, acknowledged and skipped without the
handler), read the aggregates' last applied positions, call the handler for each event that may
be applied, with the same connection, move the positions, commit. The broker acknowledgement
comes after the commit, so a crash between the two only causes a redelivery, which the inbox row
turns into a skip: every event is applied exactly once, whatever is killed when. The set-based
statements make the kit's own cost a few round trips per batch rather than per event.

A handler that raises rolls the whole batch back (``HandlerFailed`` says which event): the
caller applies the events before it again, alone, and retries the failed one on its own, so a
poison event costs one extra pass and never reorders its aggregate.

The ordering guard is ``plan``, pure logic. An event's position is ``(source.commit_lsn,
source.lsn)``: it rises in commit order, and an event read from the table (``source.snapshot``)
carries its snapshot's position (all of a backfill's rows share it, and every streamed event
after it is larger) or ``0/0`` for a replay, which is "older than anything applied": a replayed
event fills a gap only where its aggregate has nothing newer, otherwise ``ordering_policy``
decides (skip and count by default; ``apply``; ``park`` for an operator).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import msgspec
import psycopg

from cdc_relay.lsn import Lsn
from cdc_relay.messages import EnvelopeV1

Conn: TypeAlias = "psycopg.Connection[Any]"
Handler = Callable[[EnvelopeV1, Conn], None]
Position: TypeAlias = tuple[Lsn, Lsn]
Aggregate: TypeAlias = tuple[str, str]
# sql/inbox.sql holds the same statements, with comments (a test keeps them equal)
INBOX_DDL = """\
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
CREATE TABLE IF NOT EXISTS cdc_relay_inbox_positions (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    commit_lsn     pg_lsn NOT NULL,
    lsn            pg_lsn NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS cdc_relay_inbox_parked (
    id        text        PRIMARY KEY,
    envelope  jsonb       NOT NULL,
    reason    text        NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

_decoder = msgspec.json.Decoder(EnvelopeV1)


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # the id was taken before: not recorded again
    SKIPPED = "skipped"  # older than what its aggregate has (ordering_policy = skip)
    PARKED = "parked"


class NotAnEnvelope(ValueError):
    """The body is not a v1 envelope: nothing to apply, nothing a retry changes."""


class HandlerFailed(Exception):
    """The handler raised for ``events[index]``; the batch's transaction was rolled back."""

    def __init__(self, index: int, cause: BaseException) -> None:
        self.index = index
        self.cause = cause
        super().__init__(f"handler failed on event {index} of the batch: {type(cause).__name__}")


def decode(body: bytes) -> EnvelopeV1:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NotAnEnvelope(str(exc)) from None


def position(event: EnvelopeV1) -> Position:
    try:
        return Lsn.parse(event.source.commit_lsn), Lsn.parse(event.source.lsn)
    except Exception:  # noqa: BLE001 - any unreadable position is the same refusal
        raise NotAnEnvelope(
            f"source.commit_lsn / source.lsn are not LSNs: {event.source.commit_lsn!r}"
        ) from None


def verdict(event: Position, applied: Position | None) -> bool:
    """Whether an event at ``event`` may be applied after ``applied`` (None: nothing yet).

    Equal positions are allowed: the rows of one backfill share their snapshot's position, and
    a streamed event cannot repeat one (the id check catches the same event twice).
    """
    return applied is None or event >= applied


def plan(
    events: Sequence[EnvelopeV1],
    fresh: set[str],
    applied: Mapping[Aggregate, Position],
    policy: str,
    positions: Sequence[Position] | None = None,
) -> tuple[list[Outcome], dict[Aggregate, Position]]:
    """What happens to each event of a batch, in order, and the positions it leaves.

    ``fresh`` are the ids this batch recorded first (the others were taken before, or earlier
    in the same batch); ``applied`` the aggregates' positions before the batch. The positions
    move as the batch applies, so a later event of the batch is judged against an earlier one.
    ``positions``: the events' positions when the caller has them already.
    """
    now = dict(applied)
    moved: dict[Aggregate, Position] = {}
    seen: set[str] = set()
    outcomes = []
    if positions is None:
        positions = [position(e) for e in events]
    for event, at in zip(events, positions, strict=True):
        if event.id not in fresh or event.id in seen:
            outcomes.append(Outcome.DUPLICATE)
            continue
        seen.add(event.id)
        key = (event.aggregate_type, event.aggregate_id)
        last = now.get(key)
        if not verdict(at, last) and policy != "apply":
            outcomes.append(Outcome.PARKED if policy == "park" else Outcome.SKIPPED)
            continue
        outcomes.append(Outcome.APPLIED)
        if last is None or at > last:
            now[key] = moved[key] = at
    return outcomes, moved


def setup(conn: Conn) -> None:
    """Create the inbox tables if they are missing (sql/inbox.sql)."""
    with conn.transaction():
        conn.execute(INBOX_DDL.encode())


def process(conn: Conn, event: EnvelopeV1, handler: Handler, policy: str) -> Outcome:
    """One event in its own transaction; the handler's exception propagates."""
    try:
        return apply(conn, [event], handler, policy)[0]
    except HandlerFailed as failed:
        raise failed.cause from None


def apply(
    conn: Conn,
    events: Sequence[EnvelopeV1],
    handler: Handler,
    policy: str,
    positions: Sequence[Position] | None = None,
) -> list[Outcome]:
    """A batch in one transaction on ``conn``; the caller acknowledges after this returns.

    Raises ``HandlerFailed`` (everything rolled back, the inbox rows included, so a retry starts
    clean) when the handler raises; errors of the inbox's own statements propagate as they are.
    """
    if positions is None:
        positions = [position(e) for e in events]
    with conn.transaction():
        fresh = _record(conn, events)
        keys = sorted({(e.aggregate_type, e.aggregate_id) for e in events if e.id in fresh})
        applied = _positions(conn, keys)
        outcomes, moved = plan(events, fresh, applied, policy, positions)
        for i, (event, outcome) in enumerate(zip(events, outcomes, strict=True)):
            if outcome is Outcome.APPLIED:
                try:
                    handler(event, conn)
                except Exception as exc:  # the handler is the user's code: anything
                    raise HandlerFailed(i, exc) from exc
        held = [(e, o) for e, o in zip(events, outcomes, strict=True) if o in _HELD]
        if held:
            _hold(conn, held, {**applied, **moved})
        if moved:
            _move(conn, moved)
    return outcomes


_HELD = (Outcome.SKIPPED, Outcome.PARKED)


# The batch's values travel as one JSON document that PostgreSQL unpacks (jsonb_array_elements):
# msgspec encodes it in C, where psycopg's array dumpers cost microseconds per element in Python.
def _record(conn: Conn, events: Sequence[EnvelopeV1]) -> set[str]:
    rows = _encode(
        [
            (
                e.id,
                e.aggregate_type,
                e.aggregate_id,
                e.type,
                e.source.commit_lsn,
                e.source.lsn,
                e.committed_at,
                e.occurred_at,
            )
            for e in events
        ]
    )
    taken = conn.execute(
        "INSERT INTO cdc_relay_inbox (id, aggregate_type, aggregate_id, type, commit_lsn, lsn, "
        "committed_at, occurred_at, outcome) "
        "SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::pg_lsn, (e->>5)::pg_lsn, "
        "(e->>6)::timestamptz, (e->>7)::timestamptz, 'applied' "
        "FROM jsonb_array_elements(%s::jsonb) AS e ON CONFLICT (id) DO NOTHING RETURNING id",
        (rows,),
    ).fetchall()
    return {str(r[0]) for r in taken}


def _positions(conn: Conn, keys: list[Aggregate]) -> dict[Aggregate, Position]:
    """The aggregates' positions, locked in key order (two consumers cannot deadlock on them)."""
    if not keys:
        return {}
    rows = conn.execute(
        "SELECT p.aggregate_type, p.aggregate_id, (p.commit_lsn - '0/0')::bigint, "
        "(p.lsn - '0/0')::bigint "
        "FROM cdc_relay_inbox_positions p JOIN jsonb_array_elements(%s::jsonb) AS k "
        "ON p.aggregate_type = k->>0 AND p.aggregate_id = k->>1 "
        "ORDER BY p.aggregate_type, p.aggregate_id FOR UPDATE OF p",
        (_encode(keys),),
    ).fetchall()
    return {(str(r[0]), str(r[1])): (Lsn(int(str(r[2]))), Lsn(int(str(r[3])))) for r in rows}


def _encode(rows: object) -> str:
    return _json.encode(rows).decode()


_json = msgspec.json.Encoder()


def _hold(
    conn: Conn,
    held: list[tuple[EnvelopeV1, Outcome]],
    newest: Mapping[Aggregate, Position],
) -> None:
    conn.execute(
        "UPDATE cdc_relay_inbox AS b SET outcome = u.o FROM unnest(%s::text[], %s::text[]) "
        "AS u(i, o) WHERE b.id = u.i",
        ([e.id for e, _ in held], [o.value for _, o in held]),
    )
    parked = [e for e, o in held if o is Outcome.PARKED]
    for event in parked:
        at = position(event)
        last = newest.get((event.aggregate_type, event.aggregate_id))
        conn.execute(
            "INSERT INTO cdc_relay_inbox_parked (id, envelope, reason) "
            "VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (
                event.id,
                msgspec.json.encode(event).decode(),
                f"position {at[0]}/{at[1]} is older than the last applied "
                + ("one" if last is None else f"{last[0]}/{last[1]}"),
            ),
        )


def _move(conn: Conn, moved: Mapping[Aggregate, Position]) -> None:
    """Raise the aggregates' positions; a position never goes down, even under a race."""
    conn.execute(
        "INSERT INTO cdc_relay_inbox_positions AS p (aggregate_type, aggregate_id, commit_lsn, "
        "lsn) SELECT k->>0, k->>1, (k->>2)::pg_lsn, (k->>3)::pg_lsn "
        "FROM jsonb_array_elements(%s::jsonb) AS k ON CONFLICT (aggregate_type, aggregate_id) "
        "DO UPDATE SET commit_lsn = excluded.commit_lsn, lsn = excluded.lsn "
        "WHERE (p.commit_lsn, p.lsn) < (excluded.commit_lsn, excluded.lsn)",
        (_encode([(t, i, str(c), str(ln)) for (t, i), (c, ln) in sorted(moved.items())]),),
    )
