"""Handlers the consumer section gives ``cdc-relay consume --handler``.

``apply_nothing`` makes the drain measure the kit's own cost per event (decode, the inbox row,
the ordering guard, the transaction, the ack) and nothing of a user's. ``reserve_stock`` is
what a warehouse does with a reservation (as ``tests/demo.py``'s handler): one upsert of its
stock row, in the kit's transaction, so the end-to-end ages include a realistic write.

The kit imports this module in its own process (cwd is the repository), so it stays light: no
harness imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import psycopg

    from cdc_relay.messages import EnvelopeV1

WAREHOUSE_DDL = (
    "CREATE TABLE IF NOT EXISTS warehouse_stock "
    "(sku text PRIMARY KEY, reserved bigint NOT NULL, updated_at timestamptz NOT NULL)"
)


class Reservation(msgspec.Struct):
    """The part of the benchmark's payload a warehouse reads (``benchmarks.workload``)."""

    sku: str
    qty: int


_reservation = msgspec.json.Decoder(Reservation)


def apply_nothing(event: EnvelopeV1, conn: psycopg.Connection[Any]) -> None:
    """The kit's own cost, with no user work beside it."""


def reserve_stock(event: EnvelopeV1, conn: psycopg.Connection[Any]) -> None:
    """Add the event's quantity to its SKU's reserved stock (97 SKUs: rows are updated, not
    only inserted, as in a real warehouse)."""
    r = _reservation.decode(event.payload)
    conn.execute(
        "INSERT INTO warehouse_stock (sku, reserved, updated_at) VALUES (%s, %s, now()) "
        "ON CONFLICT (sku) DO UPDATE SET reserved = warehouse_stock.reserved + excluded.reserved, "
        "updated_at = excluded.updated_at",
        (r.sku, r.qty),
    )
