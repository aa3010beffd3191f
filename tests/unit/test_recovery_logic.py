"""The pure parts of backfill, recover and replay: records in the publication comment, the
confirmed prefix, --since parsing and suggestions, and what marks a table-read event."""

from __future__ import annotations

import datetime as dt
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika.spec import BasicProperties

from cdc_relay import backfill, catalog, cli
from cdc_relay.confirms import ConfirmedPrefix
from cdc_relay.errors import ConfigError
from cdc_relay.lsn import Lsn
from cdc_relay.messages import REPLAY_HEADER, MessageBuilder, TransactionInfo
from cdc_relay.outbox import OutboxEvent

MARKER = catalog.SlotMarker("s1", "0/16B3748", "7301234567890123456", 1, "2026-11-28T08:00:00Z")
AT = dt.datetime(2026, 11, 28, 9, 30, tzinfo=dt.UTC)


# -- the pending-backfill record ---------------------------------------------------------------
def test_pending_record_round_trips_and_leaves_other_lines_alone() -> None:
    comment = "owned by the orders team\n" + MARKER.line()
    state = backfill.Pending(
        slot="s1",
        at="0/5000",
        since=AT,
        table="public.outbox",
        after=("2026-11-28 09:00:00.5+00", "a b c"),
        rows=4000,
        started=AT,
    )
    written = backfill.with_pending(comment, "s1", state)
    assert written.splitlines()[:2] == comment.splitlines()
    assert backfill.parse_pending(written) == {"s1": state}
    assert catalog.parse_markers(written)["s1"] == MARKER
    other = backfill.with_pending(written, "s2", backfill.Pending(slot="s2"))
    assert set(backfill.parse_pending(other)) == {"s1", "s2"}
    moved = backfill.with_pending(other, "s1", msgspec_replace(state, rows=9000))
    assert backfill.parse_pending(moved)["s1"].rows == 9000
    assert moved.count("backfill of slot s1 ") == 1
    cleared = backfill.with_pending(moved, "s1", None)
    assert set(backfill.parse_pending(cleared)) == {"s2"}
    assert "owned by the orders team" in cleared and MARKER.line() in cleared


def msgspec_replace(state: backfill.Pending, **changes: object) -> backfill.Pending:
    return msgspec.structs.replace(state, **changes)


def test_a_damaged_pending_line_is_ignored_not_misread() -> None:
    comment = "cdc-relay: backfill of slot s1 {not json\ncdc-relay: backfill of slot s2 []"
    assert backfill.parse_pending(comment) == {}
    assert backfill.parse_pending(None) == {}


@given(
    st.text(min_size=1, max_size=30).filter(lambda t: "\n" not in t and "\r" not in t),
    st.text(max_size=40),
)
def test_any_cursor_key_survives_the_comment(created: str, ident: str) -> None:
    state = backfill.Pending(slot="s1", at="0/1", after=(created, ident), rows=1)
    assert backfill.parse_pending(backfill.with_pending(None, "s1", state))["s1"] == state


# -- the confirmed prefix --------------------------------------------------------------------------
def test_confirmed_prefix_moves_only_over_a_contiguous_run() -> None:
    prefix: ConfirmedPrefix[str] = ConfirmedPrefix()
    for key in "abcdef":
        prefix.sent(key)
    prefix.ack(3, False)  # c ahead of a gap
    assert (prefix.confirmed, prefix.confirmed_key) == (0, None)
    prefix.ack(1, False)
    assert (prefix.confirmed, prefix.confirmed_key) == (1, "a")
    prefix.ack(2, False)  # fills the gap: c counts now
    assert (prefix.confirmed, prefix.confirmed_key) == (3, "c")
    prefix.ack(5, True)  # multiple: d and e
    assert (prefix.confirmed, prefix.confirmed_key, prefix.in_flight) == (5, "e", 1)
    prefix.ack(5, False)  # a repeated ack changes nothing
    prefix.ack(6, False)
    assert (prefix.confirmed, prefix.confirmed_key, prefix.in_flight) == (6, "f", 0)


@given(st.permutations(list(range(1, 41))), st.sets(st.integers(1, 40)))
def test_confirmed_prefix_counts_each_message_once_in_any_ack_order(
    order: list[int], multiples: set[int]
) -> None:
    prefix: ConfirmedPrefix[int] = ConfirmedPrefix()
    for n in range(1, 41):
        assert prefix.sent(n) == n
    acked: set[int] = set()
    for tag in order:
        multiple = tag in multiples
        prefix.ack(tag, multiple)
        acked |= set(range(1, tag + 1)) if multiple else {tag}
        run = 0
        while run + 1 in acked:
            run += 1
        assert prefix.confirmed == run
        assert prefix.confirmed_key == (run or None)
    assert prefix.in_flight == 0


# -- recover --since -------------------------------------------------------------------------------
def test_since_is_iso_or_a_duration_ago() -> None:
    assert cli.parse_time("2026-11-28T09:30:00Z", "since") == AT
    assert cli.parse_time("2026-11-28 09:30", "since") == AT  # no zone: UTC
    assert cli.parse_time("2026-11-28T10:30:00+01:00", "since") == AT
    ago = cli.parse_time("6h", "since")
    expected = dt.datetime.now(dt.UTC) - dt.timedelta(hours=6)
    assert abs((ago - expected).total_seconds()) < 5
    with pytest.raises(ConfigError, match=r"setting since: not a time \(expected ISO 8601"):
        cli.parse_time("yesterday", "since")


def test_suggested_since_prefers_the_recorded_confirmed_commit() -> None:
    confirmed = catalog.Confirmed("s1", "0/9000", AT)
    comment = catalog.with_confirmed(MARKER.line(), confirmed)
    assert catalog.parse_confirmed(comment) == {"s1": confirmed}
    again = catalog.with_confirmed(comment, catalog.Confirmed("s1", "0/9100", AT))
    assert again.count("confirmed 0/9") == 1 and "0/9100" in again
    found = catalog.suggested_since(comment, "s1")
    assert found is not None
    assert found[0] == AT - catalog.SINCE_MARGIN
    assert "5 minutes before the last commit the relay recorded as confirmed (0/9000" in found[1]
    marker_only = catalog.suggested_since(MARKER.line(), "s1")
    assert marker_only is not None
    assert marker_only[0] == dt.datetime(2026, 11, 28, 8, tzinfo=dt.UTC)
    assert "when the slot was recorded" in marker_only[1]
    assert catalog.suggested_since(comment, "other") is None
    assert catalog.suggested_since(None, "s1") is None


# -- what marks an event read from the table -------------------------------------------------------
EVENT = OutboxEvent(
    id="7b2f6f3e-0000-4000-8000-000000000001",
    aggregate_type="order",
    aggregate_id="ORD-1",
    type="OrderPlaced",
    payload=b'{"n":1}',
    headers=None,
    traceparent=None,
    created_at="2026-11-28 09:00:00+00",
    lsn=Lsn(0x5000),
    table="public.outbox",
)


def _builder() -> MessageBuilder:
    return MessageBuilder("s1", "app", "{aggregatetype}.{type}", "outbox")


def test_a_streamed_body_does_not_carry_the_snapshot_field() -> None:
    tx = TransactionInfo(9, Lsn(0x5100), 849_000_000_000_000)
    body = json.loads(_builder().build(EVENT, tx).body)
    assert "snapshot" not in body["source"]


def test_a_backfilled_event_is_marked_and_otherwise_the_same() -> None:
    streamed = _builder().build(EVENT, TransactionInfo(9, Lsn(0x5100), 849_000_000_000_000))
    read = _builder().build(
        EVENT, TransactionInfo(9, Lsn(0x5100), 849_000_000_000_000, snapshot=True)
    )
    a, b = json.loads(streamed.body), json.loads(read.body)
    assert b["source"].pop("snapshot") is True
    assert a == b
    assert streamed.properties == read.properties
    assert streamed.message_id == read.message_id


def test_a_replayed_event_carries_the_replay_header() -> None:
    tx = TransactionInfo(9, Lsn(0), 849_000_000_000_000, snapshot=True, replay="r-1")
    out = _builder().build(EVENT, tx)
    assert out.headers[REPLAY_HEADER] == "r-1"
    decoded = BasicProperties()
    decoded.decode(out.properties)
    assert decoded.headers[REPLAY_HEADER] in ("r-1", b"r-1")
    assert decoded.message_id == EVENT.id
