"""Which WAL position the relay may report as flushed: the checkpoint rule, as pure logic.

PostgreSQL drops WAL (and, on restart, skips transactions) up to the flush LSN we report, so
that LSN is the relay's promise that every outbox event before it is safely in RabbitMQ. The
tracker therefore moves it only past a transaction whose Commit has arrived and whose messages
were all confirmed, and only when every earlier transaction is likewise done — acks may come
back in any order, but a gap must never be skipped (DESIGN.md, "The checkpoint rule").

Delivery tags on a confirm-mode channel are 1, 2, 3, ... in publish order and transactions
arrive in commit order, so "this transaction and every one before it are done" is the same as
"every tag up to this transaction's last tag is acked". That lets the tracker keep a contiguous
acked prefix instead of per-message state, and one ``(end_lsn, last_tag)`` entry per committed
transaction still waiting for acks. Entries sharing a last tag (transactions without outbox rows)
collapse into one, so memory is bounded by the messages in flight, not by the number of
transactions streamed.

One tracker serves one replication session: after a reconnect the channel's tags restart at 1
and the slot replays from its confirmed position, so the daemon starts a fresh tracker.
"""

from __future__ import annotations

import heapq
from collections import deque

from cdc_relay.lsn import Lsn

__all__ = ["CheckpointTracker"]


class CheckpointTracker:
    """Publish tags ↔ transaction end LSNs; broker confirms → the flush LSN we may report."""

    __slots__ = (
        "_acked",
        "_confirmed",
        "_failed",
        "_last_tag",
        "_ooo_heap",
        "_ooo_set",
        "_open",
        "_pending",
        "_received",
    )

    def __init__(self, start: Lsn) -> None:
        # The slot's confirmed_flush_lsn: PostgreSQL already holds us to it, so it is the floor.
        self._confirmed: Lsn = start
        self._received: Lsn = start
        self._open = False
        self._failed = False
        # Tags 1.._last_tag were issued; 1.._acked are all acked (the contiguous prefix).
        self._last_tag = 0
        self._acked = 0
        # Tags acked ahead of a gap. The set answers "already counted?" for duplicate acks; the
        # heap finds the smallest one so a `multiple` ack can absorb them without a full scan.
        self._ooo_set: set[int] = set()
        self._ooo_heap: list[int] = []
        # Committed transactions waiting for acks, oldest first: (end_lsn, last tag issued at
        # its Commit). Invariant: last tags strictly increase and every one is > _acked.
        self._pending: deque[tuple[Lsn, int]] = deque()

    # -- the WAL side -------------------------------------------------------------------------

    def begin(self) -> None:
        """Open a transaction; two Begins without a Commit mean the stream was misread."""
        if self._open:
            raise ValueError("begin() while a transaction is already open (missing Commit?)")
        self._open = True

    def publish(self) -> int:
        """Issue the next delivery tag; it must match the channel's own numbering."""
        if not self._open:
            raise ValueError("publish() outside a transaction (missing Begin?)")
        tag = self._last_tag + 1
        self._last_tag = tag
        return tag

    def commit(self, end_lsn: Lsn) -> None:
        """Close the open transaction; it counts once every tag issued so far is acked.

        A transaction that published nothing ends on the previous transaction's last tag, so it
        is done exactly when its predecessor is: it takes over the tail entry (same last tag)
        instead of growing the queue, or advances at once when nothing is outstanding.
        """
        if not self._open:
            raise ValueError("commit() without an open transaction (missing Begin?)")
        self._open = False
        last = self._last_tag
        pending = self._pending
        if pending:
            tail_lsn, tail_tag = pending[-1]
            if tail_tag == last:
                pending[-1] = (max(tail_lsn, end_lsn), last)
            else:
                pending.append((end_lsn, last))
        elif last <= self._acked:
            if not self._failed and end_lsn > self._confirmed:
                self._confirmed = end_lsn
        else:
            pending.append((end_lsn, last))

    def received(self, lsn: Lsn) -> None:
        """Remember the furthest WAL position the server sent, for the status update's write."""
        self._received = max(self._received, lsn)

    def keepalive(self, wal_end: Lsn) -> bool:
        """Idle advance (rule 5): with nothing of ours outstanding, the WAL up to wal_end holds
        no outbox event we still owe, so retaining it would only fill the server's disk.

        Returns whether the confirmed point moved, so the caller can send a status update soon.
        Does not record wal_end as received; call received() for that.
        """
        if self._failed or self._open or self._pending or self.in_flight:
            return False
        if wal_end > self._confirmed:
            self._confirmed = wal_end
            return True
        return False

    # -- the broker side ----------------------------------------------------------------------

    def ack(self, tag: int, multiple: bool) -> None:
        """Record a basic.ack; a stale or duplicate ack (tag already counted) is harmless."""
        acked = self._acked
        if tag <= acked:
            if tag < 1:
                raise ValueError(f"ack of delivery tag {tag}: tags start at 1")
            return
        if tag > self._last_tag:
            raise ValueError(f"ack of delivery tag {tag}, but only {self._last_tag} were issued")
        if multiple or tag == acked + 1:
            self._acked = tag
            if self._ooo_heap:
                self._absorb_out_of_order()
        else:
            if tag not in self._ooo_set:
                self._ooo_set.add(tag)
                heapq.heappush(self._ooo_heap, tag)
            return
        pending = self._pending
        if pending and pending[0][1] <= self._acked:
            self._release_done()

    def nack(self, tag: int, multiple: bool) -> None:
        """The broker lost a message: nothing after the current point may ever be confirmed.

        `multiple` does not matter, one lost message is enough. Fails first, then complains about
        an unknown tag, so confusion never leaves the tracker able to advance.
        """
        self._failed = True
        if not 1 <= tag <= self._last_tag:
            raise ValueError(f"nack of delivery tag {tag}, but only {self._last_tag} were issued")

    def fail(self) -> None:
        """Confirms can no longer be trusted to arrive (timeout, lost connection, a return of
        an unroutable message, a state that proved inconsistent): freeze."""
        self._failed = True

    # -- what to report -----------------------------------------------------------------------

    @property
    def confirmed(self) -> Lsn:
        """Flush (= apply) LSN for the standby status update; never decreases."""
        return self._confirmed

    @property
    def written(self) -> Lsn:
        """Write LSN for the status update; never behind flush, which PostgreSQL expects."""
        return self._received if self._received > self._confirmed else self._confirmed

    @property
    def acked_through(self) -> int:
        """Every tag up to this one is confirmed (the contiguous prefix)."""
        return self._acked

    @property
    def in_flight(self) -> int:
        """Published but not yet acked: what backpressure compares with the window."""
        return self._last_tag - self._acked - len(self._ooo_set)

    @property
    def in_transaction(self) -> bool:
        """A Begin arrived without its Commit: graceful stop must read on until it does."""
        return self._open

    @property
    def failed(self) -> bool:
        """The confirmed point is frozen for the rest of this session; reconnect to recover."""
        return self._failed

    @property
    def idle(self) -> bool:
        """Nothing open or owed: a graceful stop can send its final status and exit."""
        return not self._open and not self._pending and self.in_flight == 0

    @property
    def last_tag(self) -> int:
        """The newest delivery tag issued (0 before the first publish)."""
        return self._last_tag

    @property
    def pending_transactions(self) -> int:
        """Committed transactions still waiting for acks (after merging), for metrics."""
        return len(self._pending)

    # -- internals ----------------------------------------------------------------------------

    def _absorb_out_of_order(self) -> None:
        # Each out-of-order tag is pushed once and popped once, so this is amortised O(log n)
        # per ack however the broker interleaves single and multiple acks.
        heap = self._ooo_heap
        seen = self._ooo_set
        acked = self._acked
        while heap and heap[0] <= acked + 1:
            tag = heapq.heappop(heap)
            seen.discard(tag)
            if tag == acked + 1:
                acked = tag
        self._acked = acked

    def _release_done(self) -> None:
        # Entries leave the queue even after a failure so memory stays bounded, but the
        # confirmed point only moves while the session is healthy.
        pending = self._pending
        acked = self._acked
        newest = self._confirmed
        while pending and pending[0][1] <= acked:
            end_lsn = pending.popleft()[0]
            newest = max(newest, end_lsn)
        if not self._failed:
            self._confirmed = newest
