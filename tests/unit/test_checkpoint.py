"""The checkpoint rule: the flush LSN moves only past transactions fully confirmed, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from cdc_relay.checkpoint import CheckpointTracker
from cdc_relay.lsn import Lsn

START = Lsn(1000)


def txn(tracker: CheckpointTracker, end: int, messages: int) -> list[int]:
    """Stream one whole transaction (Begin, publishes, Commit); return its delivery tags."""
    tracker.begin()
    tags = [tracker.publish() for _ in range(messages)]
    tracker.commit(Lsn(end))
    return tags


# -- starting state ---------------------------------------------------------------------------


def test_starts_at_the_slot_position_and_idle() -> None:
    t = CheckpointTracker(START)
    assert t.confirmed == START
    assert t.written == START
    assert t.in_flight == 0
    assert not t.in_transaction
    assert not t.failed
    assert t.idle
    assert t.last_tag == 0
    assert t.pending_transactions == 0


def test_tags_are_one_based_and_consecutive_across_transactions() -> None:
    t = CheckpointTracker(START)
    assert txn(t, 1100, 3) == [1, 2, 3]
    assert txn(t, 1200, 2) == [4, 5]
    assert t.last_tag == 5
    assert t.in_flight == 5


# -- rule 2/3: done transactions, in order ----------------------------------------------------


def test_transaction_advances_only_after_commit_and_all_acks() -> None:
    t = CheckpointTracker(START)
    t.begin()
    a = t.publish()
    b = t.publish()
    t.ack(a, multiple=False)
    t.ack(b, multiple=False)
    # Everything acked, but the Commit has not arrived: more rows may still follow.
    assert t.confirmed == START
    assert t.in_transaction
    t.commit(Lsn(1100))
    assert t.confirmed == Lsn(1100)
    assert t.idle


def test_commit_before_acks_waits_for_the_last_ack() -> None:
    t = CheckpointTracker(START)
    tags = txn(t, 1100, 3)
    t.ack(tags[0], multiple=False)
    t.ack(tags[1], multiple=False)
    assert t.confirmed == START
    assert t.in_flight == 1
    assert not t.idle
    t.ack(tags[2], multiple=False)
    assert t.confirmed == Lsn(1100)
    assert t.in_flight == 0


def test_out_of_order_single_acks_do_not_skip_a_gap() -> None:
    t = CheckpointTracker(START)
    first = txn(t, 1100, 2)  # tags 1, 2
    second = txn(t, 1200, 3)  # tags 3, 4, 5
    # The later transaction completes first: it must not be confirmed past the earlier one.
    for tag in reversed(second):
        t.ack(tag, multiple=False)
    assert t.confirmed == START
    assert t.in_flight == 2
    t.ack(first[1], multiple=False)
    assert t.confirmed == START
    t.ack(first[0], multiple=False)
    # Filling the gap releases both at once.
    assert t.confirmed == Lsn(1200)
    assert t.in_flight == 0
    assert t.idle


def test_ack_5_then_3_then_the_rest() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 3)  # 1, 2, 3
    txn(t, 1200, 2)  # 4, 5
    t.ack(5, multiple=False)
    t.ack(3, multiple=False)
    assert t.confirmed == START
    t.ack(1, multiple=False)
    t.ack(2, multiple=False)
    assert t.confirmed == Lsn(1100)
    t.ack(4, multiple=False)
    assert t.confirmed == Lsn(1200)


def test_multiple_ack_spanning_transactions() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 2)  # 1, 2
    txn(t, 1200, 2)  # 3, 4
    txn(t, 1300, 2)  # 5, 6
    t.ack(4, multiple=True)
    assert t.confirmed == Lsn(1200)
    assert t.in_flight == 2
    t.ack(6, multiple=True)
    assert t.confirmed == Lsn(1300)
    assert t.idle


def test_multiple_ack_ending_mid_transaction_stops_before_it() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 2)  # 1, 2
    txn(t, 1200, 3)  # 3, 4, 5
    t.ack(4, multiple=True)
    assert t.confirmed == Lsn(1100)
    assert t.in_flight == 1


def test_multiple_ack_absorbs_earlier_out_of_order_acks() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 3)  # 1, 2, 3
    txn(t, 1200, 3)  # 4, 5, 6
    t.ack(5, multiple=False)
    t.ack(6, multiple=False)
    t.ack(2, multiple=False)
    assert t.in_flight == 3
    # Covers 1..4; 5 and 6 were already acked, so everything is done.
    t.ack(4, multiple=True)
    assert t.in_flight == 0
    assert t.confirmed == Lsn(1200)


def test_duplicate_and_stale_acks_change_nothing() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 3)
    t.ack(3, multiple=False)
    t.ack(3, multiple=False)  # duplicate of an out-of-order ack
    assert t.in_flight == 2
    t.ack(2, multiple=True)
    assert t.confirmed == Lsn(1100)
    t.ack(1, multiple=False)  # stale single
    t.ack(2, multiple=True)  # stale multiple
    t.ack(3, multiple=False)
    assert t.confirmed == Lsn(1100)
    assert t.in_flight == 0
    assert t.idle


def test_open_transaction_does_not_block_earlier_committed_ones() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 1)  # 1
    t.begin()
    t.publish()  # 2, in the open transaction
    t.ack(2, multiple=True)
    assert t.confirmed == Lsn(1100)
    assert t.in_transaction
    assert not t.idle


# -- empty transactions -----------------------------------------------------------------------


def test_empty_transaction_is_done_at_commit() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 0)
    assert t.confirmed == Lsn(1100)
    assert t.pending_transactions == 0


def test_empty_transaction_waits_behind_an_unacked_one() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 1)
    txn(t, 1200, 0)
    txn(t, 1300, 0)
    assert t.confirmed == START
    t.ack(1, multiple=False)
    # The empty transactions after it were done all along; they go with it.
    assert t.confirmed == Lsn(1300)


def test_empty_transaction_between_two_busy_ones() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 1)  # 1
    txn(t, 1200, 0)
    txn(t, 1300, 1)  # 2
    t.ack(1, multiple=False)
    assert t.confirmed == Lsn(1200)
    t.ack(2, multiple=False)
    assert t.confirmed == Lsn(1300)


def test_many_empty_transactions_do_not_grow_memory() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 1)
    for i in range(10_000):
        txn(t, 1200 + i, 0)
    assert t.pending_transactions == 1
    txn(t, 20_000, 1)
    for i in range(10_000):
        txn(t, 20_001 + i, 0)
    assert t.pending_transactions == 2
    t.ack(2, multiple=True)
    assert t.confirmed == Lsn(30_000)
    assert t.pending_transactions == 0


def test_queue_is_bounded_by_messages_in_flight() -> None:
    t = CheckpointTracker(START)
    for i in range(1000):
        txn(t, 2000 + 2 * i, 1)
        txn(t, 2001 + 2 * i, 0)
        if i >= 10:
            t.ack(i - 9, multiple=False)
        assert t.pending_transactions <= t.in_flight


# -- rule 5: idle advance ---------------------------------------------------------------------


def test_keepalive_advances_when_idle() -> None:
    t = CheckpointTracker(START)
    assert t.keepalive(Lsn(5000)) is True
    assert t.confirmed == Lsn(5000)


def test_keepalive_at_or_below_the_point_does_not_move_it() -> None:
    t = CheckpointTracker(START)
    assert t.keepalive(START) is False
    assert t.keepalive(Lsn(10)) is False
    assert t.confirmed == START


def test_keepalive_blocked_by_open_transaction() -> None:
    t = CheckpointTracker(START)
    t.begin()
    assert t.keepalive(Lsn(5000)) is False
    assert t.confirmed == START
    t.commit(Lsn(5100))
    assert t.confirmed == Lsn(5100)
    assert t.keepalive(Lsn(6000)) is True
    assert t.confirmed == Lsn(6000)


def test_keepalive_blocked_by_in_flight_messages() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 2)
    t.ack(2, multiple=False)
    assert t.keepalive(Lsn(5000)) is False
    assert t.confirmed == START


def test_keepalive_after_everything_acked_advances() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 2)
    assert t.keepalive(Lsn(5000)) is False
    t.ack(2, multiple=True)
    assert t.confirmed == Lsn(1100)
    assert t.keepalive(Lsn(5000)) is True
    assert t.confirmed == Lsn(5000)


# -- rule 4: what gets reported ---------------------------------------------------------------


def test_written_is_the_highest_received_and_never_below_flush() -> None:
    t = CheckpointTracker(START)
    t.received(Lsn(4000))
    t.received(Lsn(3000))  # an older position never moves write back
    assert t.written == Lsn(4000)
    assert t.confirmed == START
    t.keepalive(Lsn(9000))
    assert t.written == Lsn(9000)


def test_confirmed_never_decreases_on_an_older_commit() -> None:
    t = CheckpointTracker(START)
    txn(t, 900, 0)  # below the slot's position, e.g. replayed after reconnect
    assert t.confirmed == START
    txn(t, 1100, 1)
    txn(t, 1050, 0)  # merged into the tail: the newer end wins
    t.ack(1, multiple=False)
    assert t.confirmed == Lsn(1100)


# -- rule 6: failures freeze the point --------------------------------------------------------


@pytest.mark.parametrize("how", ["nack", "nack_multiple", "fail"])
def test_failure_freezes_the_confirmed_point(how: str) -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 1)  # 1
    txn(t, 1200, 2)  # 2, 3
    t.ack(1, multiple=False)
    assert t.confirmed == Lsn(1100)
    if how == "nack":
        t.nack(2, multiple=False)
    elif how == "nack_multiple":
        t.nack(3, multiple=True)
    else:
        t.fail()
    assert t.failed
    t.ack(3, multiple=True)
    txn(t, 1300, 0)
    assert t.keepalive(Lsn(9000)) is False
    assert t.confirmed == Lsn(1100)
    assert t.in_flight == 0
    assert t.pending_transactions == 0


def test_failure_while_idle_blocks_keepalive() -> None:
    t = CheckpointTracker(START)
    t.fail()
    assert t.keepalive(Lsn(5000)) is False
    txn(t, 5100, 0)
    assert t.confirmed == START


# -- misuse -----------------------------------------------------------------------------------


def test_publish_without_begin() -> None:
    with pytest.raises(ValueError, match="outside a transaction"):
        CheckpointTracker(START).publish()


def test_commit_without_begin() -> None:
    t = CheckpointTracker(START)
    with pytest.raises(ValueError, match="without an open transaction"):
        t.commit(Lsn(1100))
    txn(t, 1100, 1)
    with pytest.raises(ValueError, match="without an open transaction"):
        t.commit(Lsn(1200))


def test_begin_twice() -> None:
    t = CheckpointTracker(START)
    t.begin()
    with pytest.raises(ValueError, match="already open"):
        t.begin()


@pytest.mark.parametrize(("tag", "multiple"), [(3, False), (3, True), (0, False), (-1, True)])
def test_ack_of_a_tag_never_issued(tag: int, multiple: bool) -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 2)
    with pytest.raises(ValueError, match="delivery tag"):
        t.ack(tag, multiple=multiple)
    assert t.in_flight == 2
    assert t.confirmed == START


def test_nack_of_a_tag_never_issued_still_fails_closed() -> None:
    t = CheckpointTracker(START)
    txn(t, 1100, 1)
    with pytest.raises(ValueError, match="delivery tag"):
        t.nack(7, multiple=False)
    assert t.failed
    t.ack(1, multiple=False)
    assert t.confirmed == START


# -- stateful property test against a reference model -----------------------------------------


@dataclass
class ModelTxn:
    end: int
    tags: list[int]
    # Highest LSN (commit or keepalive) seen before this transaction began.
    watermark_at_begin: int


@dataclass
class Model:
    """The rule written the obvious way: per-message sets, full rescans, no cleverness."""

    confirmed: int
    committed: list[ModelTxn] = field(default_factory=list)
    open_tags: list[int] | None = None
    open_watermark: int = 0
    published: int = 0
    acked: set[int] = field(default_factory=set)
    failed: bool = False

    def done(self, t: ModelTxn) -> bool:
        return all(tag in self.acked for tag in t.tags)

    def first_not_done(self) -> ModelTxn | None:
        return next((t for t in self.committed if not self.done(t)), None)

    def recompute(self) -> None:
        if self.failed:
            return
        for t in self.committed:
            if not self.done(t):
                break
            self.confirmed = max(self.confirmed, t.end)

    def all_confirmed(self) -> bool:
        return len(self.acked) == self.published


class CheckpointMachine(RuleBasedStateMachine):
    allow_failures = False

    def __init__(self) -> None:
        super().__init__()
        self.start = 1_000
        self.tracker = CheckpointTracker(Lsn(self.start))
        self.model = Model(confirmed=self.start)
        self.watermark = self.start  # every LSN generated so far is <= this
        self.previous = self.start
        self.frozen_at: int | None = None

    # rules -----------------------------------------------------------------------------------

    @precondition(lambda self: self.model.open_tags is None)
    @rule()
    def begin(self) -> None:
        self.tracker.begin()
        self.model.open_tags = []
        self.model.open_watermark = self.watermark

    @precondition(lambda self: self.model.open_tags is not None)
    @rule(count=st.integers(1, 4))
    def publish(self, count: int) -> None:
        assert self.model.open_tags is not None
        for _ in range(count):
            tag = self.tracker.publish()
            self.model.published += 1
            assert tag == self.model.published
            self.model.open_tags.append(tag)

    @precondition(lambda self: self.model.open_tags is not None)
    @rule(gap=st.integers(1, 500))
    def commit(self, gap: int) -> None:
        assert self.model.open_tags is not None
        end = self.watermark + gap
        self.watermark = end
        self.tracker.commit(Lsn(end))
        self.model.committed.append(ModelTxn(end, self.model.open_tags, self.model.open_watermark))
        self.model.open_tags = None
        self.model.recompute()

    @precondition(lambda self: self.model.published > 0)
    @rule(data=st.data(), multiple=st.booleans())
    def ack(self, data: st.DataObject, multiple: bool) -> None:
        # Any issued tag, including ones already acked: stale and duplicate acks must be harmless.
        tag = data.draw(st.integers(1, self.model.published), label="tag")
        self.tracker.ack(tag, multiple)
        if multiple:
            self.model.acked.update(range(1, tag + 1))
        else:
            self.model.acked.add(tag)
        self.model.recompute()

    @precondition(lambda self: self.model.published > len(self.model.acked))
    @rule(data=st.data())
    def ack_oldest_unacked_range(self, data: st.DataObject) -> None:
        # Steers toward progress: a multiple ack from the first gap up to a random later tag.
        first_gap = min(set(range(1, self.model.published + 1)) - self.model.acked)
        tag = data.draw(st.integers(first_gap, self.model.published), label="tag")
        self.tracker.ack(tag, multiple=True)
        self.model.acked.update(range(1, tag + 1))
        self.model.recompute()

    @rule(data=st.data(), above=st.booleans())
    def keepalive(self, data: st.DataObject, above: bool) -> None:
        if above:
            wal_end = data.draw(st.integers(self.watermark, self.watermark + 500), label="wal_end")
        else:
            wal_end = data.draw(st.integers(0, self.model.confirmed), label="wal_end")
        self.watermark = max(self.watermark, wal_end)
        self.tracker.received(Lsn(wal_end))
        before = self.tracker.confirmed
        moved = self.tracker.keepalive(Lsn(wal_end))
        m = self.model
        may_move = not m.failed and m.open_tags is None and m.all_confirmed()
        if may_move:
            m.confirmed = max(m.confirmed, wal_end)
        assert moved == (self.tracker.confirmed != before)
        if moved:
            assert may_move
            assert self.tracker.confirmed == wal_end

    @precondition(lambda self: self.allow_failures and self.model.published > 0)
    @rule(data=st.data(), multiple=st.booleans())
    def nack(self, data: st.DataObject, multiple: bool) -> None:
        tag = data.draw(st.integers(1, self.model.published), label="tag")
        self.tracker.nack(tag, multiple)
        self._failed()

    @precondition(lambda self: self.allow_failures)
    @rule()
    def fail(self) -> None:
        self.tracker.fail()
        self._failed()

    def _failed(self) -> None:
        self.model.failed = True
        if self.frozen_at is None:
            self.frozen_at = self.tracker.confirmed

    # invariants ------------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        t, m = self.tracker, self.model
        assert t.confirmed == m.confirmed
        assert t.in_flight == m.published - len(m.acked)
        assert t.in_transaction == (m.open_tags is not None)
        assert t.failed == m.failed
        assert t.last_tag == m.published
        assert t.idle == (m.open_tags is None and m.all_confirmed())

    @invariant()
    def never_decreases(self) -> None:
        assert self.tracker.confirmed >= self.previous
        self.previous = self.tracker.confirmed

    @invariant()
    def frozen_after_failure(self) -> None:
        if self.frozen_at is not None:
            assert self.tracker.confirmed == self.frozen_at

    @invariant()
    def never_past_an_unconfirmed_transaction(self) -> None:
        blocker = self.model.first_not_done()
        if blocker is None:
            return
        assert self.tracker.confirmed < blocker.end
        # Nothing that happened after the blocker began may have moved the point: not its own
        # Commit, not a later one, not a keepalive.
        assert self.tracker.confirmed <= blocker.watermark_at_begin

    @invariant()
    def memory_bounded_by_unacked_span(self) -> None:
        # One entry at most per tag from the first unacked one on, however many empty
        # transactions streamed by; with in-order acks that span is exactly in_flight.
        unacked = set(range(1, self.model.published + 1)) - self.model.acked
        span = self.model.published - min(unacked) + 1 if unacked else 0
        assert self.tracker.pending_transactions <= span

    @invariant()
    def written_not_below_flush(self) -> None:
        assert self.tracker.written >= self.tracker.confirmed


class CheckpointWithFailuresMachine(CheckpointMachine):
    allow_failures = True


CheckpointMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
CheckpointWithFailuresMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60)

TestCheckpointStateful = CheckpointMachine.TestCase
TestCheckpointStatefulWithFailures = CheckpointWithFailuresMachine.TestCase
