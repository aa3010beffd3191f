"""Handlers the consumer tests load by name (`--handler tests.integration.handlers:record`)."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg

from cdc_relay.messages import EnvelopeV1


def record(event: EnvelopeV1, conn: psycopg.Connection[Any]) -> None:
    """The "business change": one row per application (no unique key, so a double apply
    shows as two rows)."""
    payload = msgspec.json.decode(event.payload) if event.payload else {}
    seq = payload.get("seq") if isinstance(payload, dict) else None
    conn.execute(
        "INSERT INTO applied_events (event_id, aggregate_id, seq) VALUES (%s, %s, %s)",
        (event.id, event.aggregate_id, seq),
    )


def poison(event: EnvelopeV1, conn: psycopg.Connection[Any]) -> None:
    """Fails for aggregate POISON, every time; applies everything else."""
    if event.aggregate_id == "POISON":
        raise ValueError("cannot apply this one")
    record(event, conn)
