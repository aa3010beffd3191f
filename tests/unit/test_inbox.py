"""The inbox's pure parts: the ordering guard, envelope decoding, and its DDL's one source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay import inbox
from cdc_relay.lsn import Lsn

REPO = Path(__file__).resolve().parents[2]

lsns = st.integers(0, 2**64 - 1).map(Lsn)
positions = st.tuples(lsns, lsns)


@given(positions, st.none() | positions)
def test_the_guard_applies_what_is_not_older_than_the_last_applied(
    event: tuple[Lsn, Lsn], applied: tuple[Lsn, Lsn] | None
) -> None:
    assert inbox.verdict(event, applied) is (applied is None or event >= applied)


def test_the_guard_orders_by_commit_then_by_position_in_the_transaction() -> None:
    applied = (Lsn(0x2000), Lsn(0x1F00))
    assert inbox.verdict((Lsn(0x2000), Lsn(0x1F80)), applied)  # later in the same transaction
    assert not inbox.verdict((Lsn(0x1FFF), Lsn(0x1FFF)), applied)  # an earlier commit
    assert inbox.verdict(applied, applied)  # the rows of one backfill share a position
    assert not inbox.verdict((Lsn(0), Lsn(0)), applied)  # a replay: older than anything


def _body(**changes: object) -> bytes:
    envelope: dict[str, object] = {
        "v": 1,
        "id": "e1",
        "aggregate_type": "order",
        "aggregate_id": "A",
        "type": "T",
        "payload": {"n": 1},
        "occurred_at": None,
        "committed_at": "2026-11-29T06:00:00Z",
        "source": {"lsn": "0/10", "commit_lsn": "0/20", "txid": 1, "slot": "s", "database": "d"},
    }
    envelope.update(changes)
    return json.dumps(envelope).encode()


def test_decode_reads_v1_and_refuses_anything_else() -> None:
    event = inbox.decode(_body())
    assert inbox.position(event) == (Lsn(0x20), Lsn(0x10))
    assert event.source.snapshot is False
    source = json.loads(_body())["source"]
    assert inbox.decode(_body(source={**source, "snapshot": True})).source.snapshot
    for bad in (b"{not json", _body(v=2), _body(id=None), b"[]"):
        with pytest.raises(inbox.NotAnEnvelope):
            inbox.decode(bad)
    with pytest.raises(inbox.NotAnEnvelope, match="not LSNs"):
        inbox.position(inbox.decode(_body(source={**source, "lsn": "x"})))


def test_sql_inbox_holds_the_statements_the_consumer_applies() -> None:
    text = (REPO / "sql" / "inbox.sql").read_text()
    code = [s.strip() for s in inbox.INBOX_DDL.split(";") if s.strip()]
    assert len(code) == 3
    no_comments = re.sub(r"--[^\n]*", "", text)
    for statement in code:
        assert statement in no_comments, statement.splitlines()[0]
