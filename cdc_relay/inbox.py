"""The inbox: apply each event once, in order per aggregate, in the consumer's own database.

One event is one transaction on the consumer's database: record the id in ``cdc_relay_inbox``
(a conflict means it was taken before: a redelivery or a replay, acknowledged and skipped
without the handler), look at the aggregate's last applied position, call the handler with the
same connection, move the position, commit. The broker acknowledgement comes after the commit,
so a crash between the two only causes a redelivery, which the inbox row turns into a skip:
every event is applied exactly once, whatever is killed when.

The ordering guard is ``verdict``, pure logic. An event's position is ``(source.commit_lsn,
source.lsn)``: it rises in commit order, and an event read from the table (``source.snapshot``)
carries its snapshot's position (all of a backfill's rows share it, and every streamed event
after it is larger) or ``0/0`` for a replay, which is "older than anything applied": a replayed
event fills a gap only where its aggregate has nothing newer, otherwise ``ordering_policy``
decides (skip and count by default; ``apply``; ``park`` for an operator).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeAlias

import msgspec
import psycopg

from cdc_relay.lsn import Lsn
from cdc_relay.messages import EnvelopeV1

Conn: TypeAlias = "psycopg.Connection[Any]"
Handler = Callable[[EnvelopeV1, Conn], None]
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


def decode(body: bytes) -> EnvelopeV1:
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NotAnEnvelope(str(exc)) from None


def position(event: EnvelopeV1) -> tuple[Lsn, Lsn]:
    try:
        return Lsn.parse(event.source.commit_lsn), Lsn.parse(event.source.lsn)
    except Exception:  # noqa: BLE001 - any unreadable position is the same refusal
        raise NotAnEnvelope(
            f"source.commit_lsn / source.lsn are not LSNs: {event.source.commit_lsn!r}"
        ) from None


def verdict(event: tuple[Lsn, Lsn], applied: tuple[Lsn, Lsn] | None) -> bool:
    """Whether an event at ``event`` may be applied after ``applied`` (None: nothing yet).

    Equal positions are allowed: the rows of one backfill share their snapshot's position, and
    a streamed event cannot repeat one (the id check catches the same event twice).
    """
    return applied is None or event >= applied


def setup(conn: Conn) -> None:
    """Create the inbox tables if they are missing (sql/inbox.sql)."""
    with conn.transaction():
        conn.execute(INBOX_DDL.encode())


def process(conn: Conn, event: EnvelopeV1, handler: Handler, policy: str) -> Outcome:
    """One event in one transaction on ``conn``; the caller acknowledges after this returns.

    A handler that raises rolls the whole transaction back (the inbox row included), so a
    retry starts clean.
    """
    at = position(event)
    with conn.transaction():
        taken = conn.execute(
            "INSERT INTO cdc_relay_inbox (id, aggregate_type, aggregate_id, type, commit_lsn, "
            "lsn, committed_at, occurred_at, outcome) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'applied') "
            "ON CONFLICT (id) DO NOTHING RETURNING 1",
            (
                event.id,
                event.aggregate_type,
                event.aggregate_id,
                event.type,
                str(at[0]),
                str(at[1]),
                event.committed_at,
                event.occurred_at,
            ),
        ).fetchone()
        if taken is None:
            return Outcome.DUPLICATE
        row = conn.execute(
            "SELECT commit_lsn::text, lsn::text FROM cdc_relay_inbox_positions "
            "WHERE aggregate_type = %s AND aggregate_id = %s FOR UPDATE",
            (event.aggregate_type, event.aggregate_id),
        ).fetchone()
        applied = None if row is None else (Lsn.parse(str(row[0])), Lsn.parse(str(row[1])))
        if not verdict(at, applied) and policy != "apply":
            outcome = Outcome.PARKED if policy == "park" else Outcome.SKIPPED
            conn.execute(
                "UPDATE cdc_relay_inbox SET outcome = %s WHERE id = %s", (outcome.value, event.id)
            )
            if outcome is Outcome.PARKED:
                conn.execute(
                    "INSERT INTO cdc_relay_inbox_parked (id, envelope, reason) "
                    "VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING",
                    (
                        event.id,
                        msgspec.json.encode(event).decode(),
                        f"position {at[0]}/{at[1]} is older than {applied}",
                    ),
                )
            return outcome
        handler(event, conn)
        if applied is None or at > applied:
            conn.execute(
                "INSERT INTO cdc_relay_inbox_positions AS p (aggregate_type, aggregate_id, "
                "commit_lsn, lsn) VALUES (%s, %s, %s, %s) ON CONFLICT (aggregate_type, "
                "aggregate_id) DO UPDATE SET commit_lsn = excluded.commit_lsn, lsn = excluded.lsn",
                (event.aggregate_type, event.aggregate_id, str(at[0]), str(at[1])),
            )
    return Outcome.APPLIED
