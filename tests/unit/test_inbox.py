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
from cdc_relay.messages import EnvelopeV1

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


def _event(eid: str, agg: str, commit: int, lsn: int) -> EnvelopeV1:
    source = {"lsn": str(Lsn(lsn)), "commit_lsn": str(Lsn(commit)), "txid": 1, "slot": "s"}
    return inbox.decode(_body(id=eid, aggregate_id=agg, source={**source, "database": "d"}))


def test_a_batch_is_judged_in_order_against_what_it_applied_itself() -> None:
    events = [
        _event("a1", "A", 0x200, 0x100),
        _event("b1", "B", 0x200, 0x110),
        _event("a0", "A", 0x100, 0x080),  # an older event of A, after a newer one in the batch
        _event("a1", "A", 0x200, 0x100),  # the same id twice in one batch
        _event("c1", "C", 0x050, 0x040),  # older than C's position before the batch
        _event("gone", "A", 0x300, 0x300),  # taken by an earlier batch
    ]
    fresh = {"a1", "b1", "a0", "c1"}
    before = {("order", "C"): (Lsn(0x60), Lsn(0x60))}
    outcomes, moved = inbox.plan(events, fresh, before, "skip")
    out = inbox.Outcome
    assert outcomes == [
        out.APPLIED,
        out.APPLIED,
        out.SKIPPED,
        out.DUPLICATE,
        out.SKIPPED,
        out.DUPLICATE,
    ]
    assert moved == {
        ("order", "A"): (Lsn(0x200), Lsn(0x100)),
        ("order", "B"): (Lsn(0x200), Lsn(0x110)),
    }
    parked, _ = inbox.plan(events, fresh, before, "park")
    assert parked[2] is out.PARKED and parked[4] is out.PARKED
    forced, moved = inbox.plan(events, fresh, before, "apply")
    assert forced[2] is out.APPLIED and forced[4] is out.APPLIED
    # applying an older event never moves its aggregate's position back
    assert moved[("order", "A")] == (Lsn(0x200), Lsn(0x100))
    assert ("order", "C") not in moved


@given(st.lists(st.tuples(st.sampled_from("AB"), st.integers(1, 50)), max_size=30))
def test_a_batch_plans_as_the_same_events_one_at_a_time(steps: list[tuple[str, int]]) -> None:
    events = [_event(f"e{i}", agg, at, at) for i, (agg, at) in enumerate(steps)]
    fresh = {e.id for e in events}
    whole, moved = inbox.plan(events, fresh, {}, "skip")
    positions: dict[tuple[str, str], tuple[Lsn, Lsn]] = {}
    single = []
    for event in events:
        outcome, step = inbox.plan([event], {event.id}, positions, "skip")
        single += outcome
        positions.update(step)
    assert whole == single
    assert positions == moved
