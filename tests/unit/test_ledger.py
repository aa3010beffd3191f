"""The ledger's hash: order-independent, and the same number PostgreSQL computes for the audit
(``bit_xor(('x' || substr(md5(id), 1, 16))::bit(64)::bigint)``; the integration test compares
the two on a real server)."""

from __future__ import annotations

import datetime as dt
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from cdc_relay import ledger
from cdc_relay.lsn import Lsn
from cdc_relay.pipeline import Delivered


def _sql_hash(ids: list[str]) -> int:
    """The SQL expression step by step: 16 hex digits, read as 64 bits, as a signed bigint."""
    out = 0
    for i in ids:
        bits = int(hashlib.md5(i.encode(), usedforsecurity=False).hexdigest()[:16], 16)
        out ^= bits - (1 << 64) if bits >= 1 << 63 else bits
    return out


@given(st.lists(st.text(min_size=1, max_size=40), max_size=20), st.randoms())
def test_the_hash_ignores_order_and_matches_the_sql_one(ids: list[str], rng: object) -> None:
    shuffled = list(ids)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert ledger.ids_hash(ids) == ledger.ids_hash(shuffled) == _sql_hash(ids)
    assert -(1 << 63) <= ledger.ids_hash(ids) < 1 << 63


def test_a_ledger_row_counts_and_hashes_the_transaction() -> None:
    at = dt.datetime(2026, 11, 29, 8, 0, tzinfo=dt.UTC)
    row = ledger.Row.of(Delivered(Lsn(0x20), Lsn(0x28), at, ("a", "b", "c")))
    assert row == ledger.Row("0/20", at, 3, ledger.ids_hash(["c", "a", "b"]))
    assert ledger.ids_hash([]) == 0 and ledger.ids_hash(["a", "a"]) == 0
