"""The session core as data: every decision of one streaming session, without any I/O.

A session reads pgoutput from the slot, publishes outbox events with confirms, and reports the
confirmed point back to PostgreSQL. This module makes each of those decisions — what to publish,
when the confirmed point moves, when to pause reading, how a stop, a halt or a failure proceeds —
from plain method calls (``copy_data``, ``ack``, ``nack``, ``tick``, ``stop_requested``,
``failure``...) and answers each call with a list of *effects* (``Publish``, ``SendStatus``,
``PauseReading``, ``Finish``...). The I/O driver (``daemon.Session``) performs the effects and
telemetry observes them; neither decides anything. That is what makes the state machine
unit-testable without a server (h11's shape: inputs in, events out, the phase is one value).

Everything a row can make go wrong is decided before a delivery tag is issued: the message is
built (and validated) first, then the tag, then the ``Publish`` effect. A tag therefore always
belongs to a message that was handed to the broker, or the session fails.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections import deque
from collections.abc import Callable

import msgspec

from cdc_relay.checkpoint import CheckpointTracker
from cdc_relay.config import Config
from cdc_relay.errors import (
    POSTGRES,
    BrokerRefused,
    ConnectionLost,
    DecodeError,
    InternalError,
    InvalidEvent,
    Nacked,
    OutboxError,
    RelayError,
)
from cdc_relay.lsn import Lsn
from cdc_relay.lsn import new_unchecked as _new_lsn
from cdc_relay.messages import MessageBuilder, OutgoingMessage, TransactionInfo
from cdc_relay.outbox import OutboxEvent, OutboxMapper
from cdc_relay.pgoutput import (
    Begin,
    Commit,
    Insert,
    Message,
    PgOutputMessage,
    Relation,
    Truncate,
    begin_fields,
    commit_fields,
    decode,
)
from cdc_relay.replication import (
    PG_EPOCH_UNIX,
    XLOG_PAYLOAD,
    PrimaryKeepalive,
    parse_copy_data,
    xlog_positions,
)

log = logging.getLogger("cdc_relay")

TICK = 1.0  # seconds between the driver's ticks; status updates while paused come this often
HEALTHY_AFTER = 60.0  # seconds of streaming after which a failure restarts the backoff afresh
_BEGIN = ord("B")
_COMMIT = ord("C")

# Errors about the data itself: the broker is fine, so the events before the bad one are let
# finish (halt) instead of being thrown away with the connection.
DATA_ERRORS = (OutboxError, DecodeError, BrokerRefused)

# Called before a message is built, when tracing is on: (event, exchange, routing key, txn) →
# the traceparent to send on.
TraceHook = Callable[[OutboxEvent, str, str, TransactionInfo], "str | None"]


class Phase(enum.Enum):
    """Where the session is. Reading is allowed in STREAMING and DRAINING only."""

    STARTING = "starting"  # connections opening; START_REPLICATION not answered yet
    STREAMING = "streaming"
    DRAINING = "draining"  # stop requested: reading on to the open transaction's Commit
    SETTLING = "settling"  # stop requested, nothing more to read: waiting for confirms
    HALTING = "halting"  # a data error: waiting for the confirms of the events before it
    CLOSED = "closed"  # Finish was emitted; every later input is ignored


# -- effects -------------------------------------------------------------------------------------
class Publish(msgspec.Struct, frozen=True, gc=False):
    """Hand ``message`` to the broker; its confirm will carry ``tag``."""

    message: OutgoingMessage
    tag: int
    dead_letter: str = ""  # why it goes to the dead-letter exchange: "oversize" or "invalid"


class SendStatus(msgspec.Struct, frozen=True, gc=False):
    """Standby status update: flush = apply = ``flush``; it never goes backwards."""

    write: Lsn
    flush: Lsn
    reply_requested: bool = False


class PauseReading(msgspec.Struct, frozen=True, gc=False):
    """Stop reading the replication socket (TCP backpressure holds the server)."""


class ResumeReading(msgspec.Struct, frozen=True, gc=False):
    """Read again, starting with whatever libpq already buffered."""


class ScheduleFlush(msgspec.Struct, frozen=True, gc=False):
    """Call ``flush_due`` after ``delay`` seconds (batches a burst of acks into one update)."""

    delay: float


class ScheduleStopTimeout(msgspec.Struct, frozen=True, gc=False):
    """Call ``stop_timeout`` after ``delay`` seconds unless the session finished by then."""

    delay: float


class Committed(msgspec.Struct, frozen=True, gc=False):
    """A transaction that carried events was read to its Commit (for latency and lag)."""

    end_lsn: Lsn
    committed_at: float  # unix seconds
    events: int


class Delivered(msgspec.Struct, frozen=True, gc=False):
    """Every event of a transaction is confirmed (``ledger = true`` only): what the delivery
    ledger records. ``ids`` are the message ids in publish order."""

    commit_lsn: Lsn
    end_lsn: Lsn
    committed_at: dt.datetime  # exactly the envelopes' committed_at
    ids: tuple[str, ...]


class Acked(msgspec.Struct, frozen=True, gc=False):
    """Acks arrived: ``count`` more events are confirmed; the confirmed point is ``confirmed``."""

    count: int
    acked_through: int
    confirmed: Lsn


class Progressed(msgspec.Struct, frozen=True, gc=False):
    """The session made progress a health check can trust (confirmed point moved, or the
    server answered while nothing was owed)."""


class Finish(msgspec.Struct, frozen=True, gc=False):
    """Close both sides. ``final_flush``: send one last status update with it first (None when
    streaming never started). ``error``: why, or None for a clean stop."""

    error: RelayError | None
    final_flush: Lsn | None
    write: Lsn


PAUSE = PauseReading()
RESUME = ResumeReading()
PROGRESSED = Progressed()

Effect = (
    Publish
    | SendStatus
    | PauseReading
    | ResumeReading
    | ScheduleFlush
    | ScheduleStopTimeout
    | Committed
    | Delivered
    | Acked
    | Progressed
    | Finish
)


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What the restart policy needs to know about a finished session."""

    healthy: bool  # it did useful work: the next failure starts the backoff afresh
    careful: bool  # the next session should publish one at a time for a while
    error: RelayError | None


class Pipeline:
    """One session's decisions. Construct it from what ``catalog.prepare`` found."""

    def __init__(
        self,
        cfg: Config,
        start: Lsn,
        mapper: OutboxMapper,
        builder: MessageBuilder,
        careful: bool = False,
        trace: TraceHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.phase = Phase.STARTING
        self.tracker = CheckpointTracker(start)
        self._start = start
        self._mapper = mapper
        self._builder = builder
        self._trace = trace
        self._careful = careful
        self._window = 1 if careful else cfg.max_in_flight
        self._bytes_limit = cfg.max_in_flight_bytes
        self._bytes = 0
        self._sizes: deque[tuple[int, int]] = deque()  # (tag, body bytes), oldest first
        self._full = False  # window latch: set at the limit, cleared at half of it
        self._per_aggregate = cfg.max_in_flight_per_aggregate == 1
        self._aggregate_tags: dict[tuple[str, str], int] = {}
        self._held: tuple[OutboxEvent, OutgoingMessage] | None = None
        self._reading = False  # what the driver was last told
        self._tx: TransactionInfo | None = None
        self._tx_events = 0
        # ledger = true: the message ids of the open transaction, and the transactions read to
        # their commit whose events are not all confirmed yet (oldest first)
        self._tx_ids: list[str] | None = [] if cfg.ledger else None
        self._undelivered: deque[Delivered] = deque()
        self._reported = start
        self._flush_scheduled = False
        # the slot may be moved through idle WAL only up to what a publication check vouched
        # for (a publication altered while streaming stops sending outbox rows silently)
        self._ceiling = start
        self._confirmed_events = 0
        self._started_at: float | None = None
        self._last_status = float("-inf")
        self._last_heard = 0.0
        self._now = 0.0
        self._asked_reply_at: float | None = None
        self._warned_prefixes: set[str] = set()
        self.ignored_messages = 0
        self.server_wal_end = start  # the furthest WAL end the server reported
        self.error: RelayError | None = None
        self._out: list[Effect] = []

    # -- what the driver asks ---------------------------------------------------------------------
    @property
    def reading(self) -> bool:
        return self._reading

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes

    def outcome(self) -> Outcome:
        # useful work = the confirmed point moved, or the session streamed a good while (an
        # idle database moves nothing). Acks alone do not count, or a row that fails after
        # others in its transaction would reset the backoff on every cycle
        streamed_for = 0.0 if self._started_at is None else self._now - self._started_at
        healthy = self.tracker.confirmed > self._start or streamed_for >= HEALTHY_AFTER
        err = self.error
        careful = isinstance(err, Nacked) or (self._careful and self._window == 1)
        return Outcome(healthy=healthy, careful=careful, error=err)

    # -- inputs ---------------------------------------------------------------------------------
    def streaming_started(self, now: float) -> list[Effect]:
        """START_REPLICATION answered: the stream is open."""
        if self.phase is Phase.STARTING:
            self.phase = Phase.STREAMING
            self._started_at = self._last_heard = self._now = now
            self._update_reading()
        return self._take()

    def copy_data(self, data: memoryview | bytes, now: float) -> list[Effect]:
        """One CopyData message from the replication stream."""
        try:
            self._copy_data(data, now)
        except Exception as exc:  # noqa: BLE001 - every failure is classified in one place
            self._on_error(exc)
        return self._take()

    def ack(self, tag: int, multiple: bool) -> list[Effect]:
        try:
            self._ack(tag, multiple)
        except Exception as exc:  # noqa: BLE001
            self._on_error(exc)
        return self._take()

    def nack(self, tag: int, multiple: bool) -> list[Effect]:
        """The broker lost a message: nothing after the current point may be confirmed."""
        if self.phase is not Phase.CLOSED:
            try:
                self.tracker.nack(tag, multiple)
                err: RelayError = Nacked(
                    "broker nacked a message (queue full or internal error); will retry",
                    slot=self.cfg.slot,
                    delivery_tag=tag,
                )
            except ValueError as exc:
                err = InternalError(f"broker nacked an unknown delivery tag: {exc}")
            self._fail(err)
        return self._take()

    def failure(self, err: RelayError) -> list[Effect]:
        """Something on either side broke (connection, channel, return, refusal): freeze."""
        if self.phase is not Phase.CLOSED:
            self._fail(err)
        return self._take()

    def stop_requested(self) -> list[Effect]:
        """SIGTERM: finish the open transaction, wait for its confirms, report, exit 0."""
        if self.phase is Phase.STARTING:
            # nothing streamed yet: there is nothing to finish
            self._finish(None)
        elif self.phase is Phase.STREAMING:
            log.info(
                "stopping: finishing the open transaction and waiting for confirms",
                extra={"in_flight": self.tracker.in_flight},
            )
            self.phase = Phase.DRAINING if self.tracker.in_transaction else Phase.SETTLING
            self._out.append(ScheduleStopTimeout(self.cfg.stop_timeout))
            self._update_reading()
            self._maybe_finish()
        return self._take()

    def stop_timeout(self) -> list[Effect]:
        if self.phase in (Phase.DRAINING, Phase.SETTLING, Phase.HALTING):
            log.warning(
                "stop timeout: unconfirmed events will be sent again on restart",
                extra={"in_flight": self.tracker.in_flight, "lsn": str(self.tracker.confirmed)},
            )
            self.tracker.fail()  # whatever arrives after this is not waited for
            self._finish(self.error)
        return self._take()

    def flush_due(self) -> list[Effect]:
        self._flush_scheduled = False
        if self._streamed and self.tracker.confirmed > self._reported:
            self._status(reply=False)
        return self._take()

    def tick(self, now: float) -> list[Effect]:
        """Once a second: periodic status updates, reply requests, replication liveness.

        While reading is paused the server's reply requests cannot be seen, so an update goes
        out every tick then: the walsender must never time out because the broker is slow.
        While reading, the relay asks the server to reply often enough that silence means a
        dead connection (half-open TCP is otherwise invisible for many minutes).
        """
        if not self._streamed:
            return self._take()
        self._now = now
        cfg = self.cfg
        if self._reading:
            silent = now - self._last_heard
            if silent >= cfg.replication_timeout:
                self._fail(
                    ConnectionLost(
                        f"PostgreSQL sent nothing for {silent:.0f} s although asked to reply: "
                        "the replication connection is presumed lost",
                        side=POSTGRES,
                        slot=cfg.slot,
                    )
                )
                return self._take()
            ask = silent >= self._reply_every
            interval = cfg.status_interval
        else:
            ask = False
            interval = min(cfg.status_interval, TICK)
        if ask and (self._asked_reply_at is None or now - self._asked_reply_at >= TICK):
            self._asked_reply_at = now
            self._status(reply=True, now=now)
        elif now - self._last_status >= interval - 0.05:
            self._status(reply=False, now=now)
        return self._take()

    def publication_checked(self, watermark: Lsn) -> list[Effect]:
        """A publication check passed after ``watermark`` was read: idle WAL up to there was
        written while the publication still covered the outbox."""
        self._ceiling = max(self._ceiling, watermark)
        return self._take()

    def publication_drifted(self, err: RelayError) -> list[Effect]:
        """The publication no longer covers the outbox as it must: stop before the slot moves
        through WAL whose outbox rows pgoutput no longer sends."""
        if self.phase is not Phase.CLOSED:
            self._halt(err)
        return self._take()

    def broker_ready(self, frame_max: int) -> list[Effect]:
        self._builder.frame_max = frame_max
        return self._take()

    # -- the replication stream -------------------------------------------------------------------
    @property
    def _streamed(self) -> bool:
        return self._started_at is not None and self.phase is not Phase.CLOSED

    @property
    def _reply_every(self) -> float:
        cfg = self.cfg
        return max(
            TICK, min(cfg.status_interval, cfg.health_timeout / 3, cfg.replication_timeout / 3)
        )

    def _copy_data(self, data: memoryview | bytes, now: float) -> None:
        if not self._reading:
            # the driver must not read while paused: dropping these bytes would skip WAL
            raise InternalError("copy data delivered while reading is paused")
        self._now = self._last_heard = now
        self._asked_reply_at = None
        tracker = self.tracker
        positions = xlog_positions(data)
        if positions is not None:
            # the per-message fast path: Begin and Commit (two of the three messages of a
            # one-event transaction) are read in place, without message objects
            start = _new_lsn(Lsn, positions[0])
            if positions[1] > self.server_wal_end:
                self.server_wal_end = _new_lsn(Lsn, positions[1])
            tracker.received(start)
            kind = data[XLOG_PAYLOAD]
            if kind == _BEGIN:
                fields = begin_fields(data, XLOG_PAYLOAD)
                if fields is not None:
                    final_lsn, commit_time, xid = fields
                    self._begin(xid, _new_lsn(Lsn, final_lsn), commit_time)
                    return
            elif kind == _COMMIT:
                commit = commit_fields(data, XLOG_PAYLOAD)
                if commit is not None:
                    self._commit(_new_lsn(Lsn, commit[2]))
                    return
            self._message_at(decode(data[XLOG_PAYLOAD:]), start)
            return
        frame = parse_copy_data(data)
        if frame.wal_end > self.server_wal_end:  # noqa: PLR1730 - cheaper than max() per message
            self.server_wal_end = frame.wal_end
        if isinstance(frame, PrimaryKeepalive):
            tracker.received(frame.wal_end)
            target = frame.wal_end if frame.wal_end < self._ceiling else self._ceiling
            if tracker.keepalive(target):
                self._progress()
            if tracker.idle:
                self._out.append(PROGRESSED)
            if frame.reply_requested:
                self._status(reply=False, now=now)
            return
        tracker.received(frame.data_start)
        self._message_at(decode(frame.payload), frame.data_start)

    def _message_at(self, msg: PgOutputMessage, lsn: Lsn) -> None:
        """One decoded pgoutput message that started at WAL position ``lsn``."""
        if isinstance(msg, Insert):
            try:
                event = self._mapper.event(msg, lsn)
            except InvalidEvent as err:
                self._invalid(err, self._open_tx(lsn))
                return
            if event is not None:
                self._publish_event(event)
        elif isinstance(msg, Begin):
            self._begin(msg.xid, msg.final_lsn, msg.commit_time)
        elif isinstance(msg, Commit):
            self._commit(msg.end_lsn)
        elif isinstance(msg, Relation):
            self._mapper.relation(msg)
        elif isinstance(msg, Truncate):
            if any(self._mapper.is_outbox_oid(oid) for oid in msg.relation_oids):
                log.info("outbox truncated; no events", extra={"lsn": str(lsn)})
        elif isinstance(msg, Message):
            self._message(msg)
        # Update, Delete, Type, Origin: no events

    def _begin(self, xid: int, final_lsn: Lsn, commit_time: int) -> None:
        self.tracker.begin()
        self._tx = TransactionInfo(xid, final_lsn, commit_time)
        self._tx_events = 0
        if self._tx_ids is not None:
            self._tx_ids = []

    def _commit(self, end_lsn: Lsn) -> None:
        tracker = self.tracker
        if not self._tx_events and end_lsn > self._ceiling:
            # a transaction that gave us nothing proves nothing about the publication (after
            # ALTER PUBLICATION ... SET TABLE other, the other table's commits still arrive):
            # like idle WAL, it is confirmed only as far as the last publication check vouches
            end_lsn = self._ceiling
        tracker.commit(end_lsn)
        tx = self._tx
        if self._tx_events and tx is not None:
            committed_at = tx.commit_time / 1e6 + PG_EPOCH_UNIX
            self._out.append(Committed(end_lsn, committed_at, self._tx_events))
            if self._tx_ids is not None:
                self._undelivered.append(
                    Delivered(tx.commit_lsn, end_lsn, tx.committed_at, tuple(self._tx_ids))
                )
                self._deliver()
        self._tx = None
        if self.phase is Phase.DRAINING:
            self.phase = Phase.SETTLING
            self._update_reading()
        self._progress()
        self._maybe_finish()

    def _message(self, msg: Message) -> None:
        mapper = self._mapper
        if msg.prefix == mapper.prefix and not msg.transactional:
            # not tied to any commit: publishing it could send an event that never committed
            self.ignored_messages += 1
            if msg.prefix not in self._warned_prefixes:
                self._warned_prefixes.add(msg.prefix)
                log.warning(
                    "non-transactional outbox message ignored: it is not part of any commit, "
                    "so it is not an event; emit it with pg_logical_emit_message(true, ...)",
                    extra={"prefix": msg.prefix, "lsn": str(msg.lsn)},
                )
            return
        try:
            event = mapper.message_event(msg)
        except InvalidEvent as err:
            self._invalid(err, self._open_tx(msg.lsn))
            return
        if event is None:
            self.ignored_messages += 1
            return
        self._publish_event(event)

    # -- publishing -----------------------------------------------------------------------------
    def _open_tx(self, lsn: Lsn) -> TransactionInfo:
        tx = self._tx
        if tx is None:
            raise OutboxError("outbox event outside a transaction", lsn=lsn)
        return tx

    def _publish_event(self, event: OutboxEvent) -> None:
        tx = self._open_tx(event.lsn)
        builder = self._builder
        try:
            traceparent = None
            if self._trace is not None:
                exchange, routing_key = builder.destination(event)
                traceparent = self._trace(event, exchange, routing_key, tx)
            out = builder.build(event, tx, traceparent)
        except InvalidEvent as err:
            self._invalid(err, tx)
            return
        if len(out.body) > self.cfg.max_message_size:
            self._emit(self._oversize(event, tx, out), dead_letter="oversize")
            self._tx_events += 1
            return
        if self._per_aggregate:
            key = (event.aggregate_type, event.aggregate_id)
            if self._aggregate_tags.get(key, 0) > self.tracker.acked_through:
                # the aggregate's previous event is unconfirmed: this one waits, and so does
                # the stream behind it, so a refusal of the previous can never be overtaken
                self._held = (event, out)
                self._update_reading()
                return
            self._remember_aggregate(key)
        self._emit(out)
        self._tx_events += 1

    def _remember_aggregate(self, key: tuple[str, str]) -> None:
        tags = self._aggregate_tags
        if len(tags) > 4 * self.cfg.max_in_flight:
            acked = self.tracker.acked_through
            for k in [k for k, t in tags.items() if t <= acked]:
                del tags[k]
        tags[key] = self.tracker.last_tag + 1

    def _release_held(self) -> None:
        held = self._held
        if held is None:
            return
        event, out = held
        key = (event.aggregate_type, event.aggregate_id)
        if self._aggregate_tags.get(key, 0) > self.tracker.acked_through:
            return
        self._held = None
        self._remember_aggregate(key)
        self._emit(out)
        self._tx_events += 1

    def _emit(self, out: OutgoingMessage, dead_letter: str = "") -> None:
        """The only place a delivery tag is issued: after the message exists in full."""
        tracker = self.tracker
        tag = tracker.publish()
        size = len(out.body)
        self._bytes += size
        self._sizes.append((tag, size))
        self._out.append(Publish(out, tag, dead_letter))
        if self._tx_ids is not None:
            self._tx_ids.append(out.message_id)
        if tracker.in_flight >= self._window or self._bytes >= self._bytes_limit:
            self._full = True
            self._update_reading()

    def _invalid(self, err: InvalidEvent, tx: TransactionInfo) -> None:
        """A row that cannot become a faithful message: the policy decides."""
        err.context["commit_lsn"] = tx.commit_lsn_text
        if self.cfg.invalid_event_policy != "dead_letter":
            err.message = (
                f"{err.message}: this row cannot be published as it is. To go on, set "
                "invalid_event_policy = dead_letter (with dead_letter_exchange) to divert it, "
                "or skip its whole transaction with pg_replication_slot_advance past its "
                "commit LSN (README: 'A row the relay cannot publish')"
            )
            raise err
        out = self._builder.dead_letter(err, tx, self.cfg.dead_letter_exchange)
        if len(out.body) > self.cfg.max_message_size:
            # the raw row itself is too large to divert: nothing left but to stop before it
            raise BrokerRefused(
                f"invalid event ({err.problem}) is too large to dead-letter whole "
                f"({len(out.body)} bytes > max_message_size {self.cfg.max_message_size}); skip "
                "its transaction by hand (README: 'A row the relay cannot publish')",
                event_id=err.context.get("event_id"),
                lsn=err.lsn,
                commit_lsn=tx.commit_lsn_text,
            )
        log.error(
            "invalid event dead-lettered",
            extra={
                "reason": err.problem,
                "column": err.column,
                "event_id": err.context.get("event_id"),
                "lsn": str(err.lsn),
                "commit_lsn": tx.commit_lsn_text,
                "dead_letter_exchange": self.cfg.dead_letter_exchange,
            },
        )
        self._emit(out, dead_letter="invalid")
        self._tx_events += 1

    def _oversize(
        self, event: OutboxEvent, tx: TransactionInfo, out: OutgoingMessage
    ) -> OutgoingMessage:
        """An event the broker can never accept: divert it, with its own confirm, or halt."""
        cfg = self.cfg
        reason = f"message of {len(out.body)} bytes exceeds max_message_size {cfg.max_message_size}"
        if not cfg.dead_letter_exchange:
            raise BrokerRefused(
                f"{reason}: set dead_letter_exchange to divert such events, or raise the "
                "broker's max_message_size and this setting",
                event_id=event.id,
                lsn=event.lsn,
                commit_lsn=tx.commit_lsn_text,
            )
        log.error(
            "event dead-lettered: payload omitted",
            extra={
                "event_id": event.id,
                "lsn": str(event.lsn),
                "size": len(out.body),
                "dead_letter_exchange": cfg.dead_letter_exchange,
            },
        )
        return self._builder.oversize(event, tx, out, cfg.dead_letter_exchange, reason)

    # -- the broker's answers ---------------------------------------------------------------------
    def _ack(self, tag: int, multiple: bool) -> None:
        if self.phase is Phase.CLOSED:
            return
        tracker = self.tracker
        before = tracker.in_flight
        try:
            tracker.ack(tag, multiple)
        except ValueError as exc:
            # the broker's numbering and ours disagree: no ack can be trusted any more
            tracker.fail()
            raise InternalError(f"delivery tags out of step with the broker: {exc}") from None
        done = before - tracker.in_flight
        if not done:
            return
        self._confirmed_events += done
        through = tracker.acked_through
        sizes = self._sizes
        while sizes and sizes[0][0] <= through:
            self._bytes -= sizes.popleft()[1]
        self._out.append(Acked(done, through, tracker.confirmed))
        if self._undelivered:
            self._deliver()
        if (
            self._window < self.cfg.max_in_flight
            and self._confirmed_events >= self.cfg.max_in_flight
        ):
            self._window = self.cfg.max_in_flight
            log.info("careful mode over: the broker accepts again", extra={"slot": self.cfg.slot})
        if self._held is not None:
            self._release_held()
        if (
            self._full
            and tracker.in_flight <= self._window // 2
            and self._bytes <= self._bytes_limit // 2
        ):
            self._full = False
        self._update_reading()
        self._progress()
        self._maybe_finish()

    def _deliver(self) -> None:
        """Hand over the transactions the confirmed point has passed, in commit order; those
        still pending when the session ends are streamed again by the next one."""
        confirmed, pending = self.tracker.confirmed, self._undelivered
        while pending and pending[0].end_lsn <= confirmed:
            self._out.append(pending.popleft())

    # -- checkpoint reporting -------------------------------------------------------------------
    def _progress(self) -> None:
        """Report a moved confirmed point soon, batching bursts of acks into one update."""
        if self.tracker.confirmed > self._reported:
            self._out.append(PROGRESSED)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._out.append(ScheduleFlush(self.cfg.flush_delay))

    def _status(self, reply: bool, now: float | None = None) -> None:
        tracker = self.tracker
        flush = tracker.confirmed
        self._out.append(SendStatus(tracker.written, flush, reply))
        self._reported = flush
        if now is not None:
            self._last_status = now

    # -- reading --------------------------------------------------------------------------------
    def _update_reading(self) -> None:
        want = (
            self.phase in (Phase.STREAMING, Phase.DRAINING)
            and not self._full
            and self._held is None
        )
        if want != self._reading:
            self._reading = want
            if want:  # silence is only measured while reading
                self._last_heard = self._now
            self._out.append(RESUME if want else PAUSE)

    # -- ending ---------------------------------------------------------------------------------
    def _maybe_finish(self) -> None:
        if (
            self.phase in (Phase.SETTLING, Phase.HALTING)
            and self.tracker.in_flight == 0
            and self._held is None
        ):
            if self.error is None:
                log.info(
                    "stopped cleanly",
                    extra={"slot": self.cfg.slot, "lsn": str(self.tracker.confirmed)},
                )
            self._finish(self.error)

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, RelayError) and not isinstance(exc, InternalError):
            if isinstance(exc, DATA_ERRORS):
                self._halt(exc)
            else:
                self._fail(exc)
            return
        if not isinstance(exc, InternalError):
            log.error("internal error", exc_info=exc)
            exc = InternalError(f"internal error: {type(exc).__name__}: {exc}")
        self._fail(exc)

    def _halt(self, err: RelayError) -> None:
        """A data error retrying cannot fix: stop reading before the bad event, but let the
        broker confirm everything already sent, so the restart after the fix replays little."""
        if self.phase is Phase.CLOSED:
            return
        if self.error is None:
            self.error = err
        if self.tracker.failed or self.phase is Phase.STARTING:
            self._finish(self.error)
            return
        log.error(
            "halting: waiting for confirms of the events before the failing one",
            extra={"in_flight": self.tracker.in_flight, "slot": self.cfg.slot},
        )
        if self.phase is not Phase.HALTING:
            if self.phase is Phase.STREAMING:  # a stop already scheduled its own timeout
                self._out.append(ScheduleStopTimeout(self.cfg.stop_timeout))
            self.phase = Phase.HALTING
        self._held = None  # an event held for its aggregate is behind the bad one: not sent
        self._update_reading()
        self._maybe_finish()

    def _fail(self, err: RelayError) -> None:
        """Confirms can no longer be trusted to arrive, or the state is suspect: freeze."""
        if self.phase is Phase.CLOSED:
            return
        if self.error is None:
            self.error = err
        self.tracker.fail()
        self._finish(self.error)

    def _finish(self, err: RelayError | None) -> None:
        self._reading = False
        streamed = self._started_at is not None
        self.phase = Phase.CLOSED
        tracker = self.tracker
        # the tracker froze on failure, so this only ever reports confirmed events
        self._out.append(Finish(err, tracker.confirmed if streamed else None, tracker.written))

    def _take(self) -> list[Effect]:
        out = self._out
        self._out = []
        return out
