"""The wiring: one event loop that owns the replication socket and the AMQP connection.

A *session* is one replication connection plus one AMQP connection. Data is decoded, mapped and
published as it arrives; confirms come back as callbacks on the same loop, so there is no queue
between threads and no lock. Any failure ends the whole session: the relay closes both sides,
backs off, and resumes from the slot — the slot's confirmed position is the only state that
survives, which is what makes a crash at any point safe (DESIGN.md, the checkpoint rule).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import msgspec
import tenacity
from pika.adapters.select_connection import IOLoop, PollEvents

from cdc_relay import catalog, failpoints
from cdc_relay.checkpoint import CheckpointTracker
from cdc_relay.config import Config
from cdc_relay.errors import BrokerRefused, Nacked, PublishFailed, RelayError, SlotBusy
from cdc_relay.health import HealthServer
from cdc_relay.lsn import Lsn
from cdc_relay.messages import MessageBuilder, OutgoingMessage, TransactionInfo
from cdc_relay.outbox import OutboxColumns, OutboxEvent, OutboxMapper
from cdc_relay.pgoutput import Begin, Commit, Insert, Message, Relation, Truncate, decode
from cdc_relay.postgres import ReplicationStream
from cdc_relay.rabbitmq import Publisher
from cdc_relay.replication import (
    PrimaryKeepalive,
    parse_copy_data,
    pg_now_us,
    standby_status_update,
)
from cdc_relay.telemetry import EVENT_CONFIRM, EVENT_FLUSH, Telemetry, tracing_requested

log = logging.getLogger("cdc_relay")

READ = PollEvents.READ
WRITE = PollEvents.WRITE
FORCED_EXIT_GRACE = 5.0  # seconds a closing session may take before the loop is stopped anyway
TICK = 1.0  # seconds between loop ticks (liveness, alerts, due status updates)


class StopSignal:
    """SIGTERM/SIGINT as something both the event loop and a backoff sleep can wait on.

    The handler only sets a flag; ``signal.set_wakeup_fd`` makes the kernel-level wakeup visible
    on a socket the loop watches, so nothing lock-taking ever runs inside a signal handler.
    """

    def __init__(self) -> None:
        self.requested = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def install(self) -> None:
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            # a second Ctrl-C: the operator wants out now
            os._exit(130)
        self.requested = True

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> None:
        try:
            while self._r.recv(512):
                pass
        except BlockingIOError:
            pass

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking at once on a stop request (tenacity's sleep)."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._r], [], [], left)
            self.drain()


class Session:
    """One streaming session; ``run`` returns on a graceful stop and raises on failure."""

    def __init__(
        self,
        cfg: Config,
        stop: StopSignal,
        careful: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.cfg = cfg
        self._telemetry = telemetry or Telemetry.create(cfg.slot, cfg.alert_latency, False)
        self._stats = self._telemetry.stats
        self._tracing = self._telemetry.tracing
        # (end_lsn, commit unix time) of committed transactions with events, not yet confirmed
        self._pending_commits: deque[tuple[int, float]] = deque()
        self._tx_events = 0
        # (delivery tag, publish time) for every 16th message: confirm latency samples
        self._latency_samples: deque[tuple[int, float]] = deque()
        # tracing only: spans of the open transaction, per committed transaction, unconfirmed
        self._open_spans: list[Any] = []
        self._span_txns: deque[tuple[int, list[Any]]] = deque()
        self._unconfirmed_spans: deque[tuple[int, Any]] = deque()
        # after a nack, publish one message at a time until the broker has accepted a full
        # window: a pipelined burst against a queue at its limit could have a later event of an
        # aggregate accepted while an earlier one is refused
        self._window = 1 if careful else cfg.max_in_flight
        self.careful = careful
        self._stop = stop
        self.healthy = False  # streamed and confirmed something: reset the backoff
        self._ioloop = IOLoop()
        self._error: RelayError | None = None
        self._done = False
        self._stopping = False
        self._read_stopped = False  # graceful stop: no more WAL after the open transaction
        self._backpressured = False
        self._streaming = False
        self._pg_events = 0
        self._pg_fd = -1
        self._last_status = 0.0
        self._last_unroutable_check = 0.0
        self._write_pending = False
        self._flush_timer: object | None = None
        self._reported = Lsn(0)
        self._tx: TransactionInfo | None = None
        self._stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
        self._tracker = CheckpointTracker(Lsn(0))
        self._mapper = OutboxMapper(
            cfg.tables,
            OutboxColumns(**{k: cfg.columns(k) for k in OutboxColumns.__dataclass_fields__}),
            message_prefix=cfg.message_prefix,
        )
        self._routes = {f"{s}.{t}": cfg.route(s, t) for s, t in cfg.tables}
        self._builder: MessageBuilder | None = None
        self._publisher = Publisher(
            cfg.amqp_url,
            [cfg.exchange, *(exchange for exchange, _ in self._routes.values())],
            cfg.exchange_type,
            cfg.declare_exchange,
            cfg.amqp_heartbeat,
            self._ioloop,
            on_ready=self._guard(self._on_broker_ready),
            on_confirm=self._guard(self._on_confirm),
            on_failure=self._fail,
            on_closed=self._on_broker_closed,
            alternate_exchange=cfg.alternate_exchange,
            dead_letter_exchange=cfg.dead_letter_exchange,
        )
        self.confirmed = 0

    # -- entry point ----------------------------------------------------------------------------
    def run(self) -> None:
        start = catalog.prepare(self.cfg)
        self._tracker = CheckpointTracker(start)
        self._reported = start
        try:
            info = self._stream.connect()
            self._builder = MessageBuilder(
                self.cfg.slot, info.dbname, self.cfg.routing_key, self.cfg.exchange, self._routes
            )
            self._ioloop.add_handler(self._stop.fileno(), self._guard(self._on_stop_signal), READ)
            self._publisher.connect()
            if self._stop.requested:
                self._ioloop.add_callback_threadsafe(self._guard(self._request_stop))
            self._ioloop.start()
        finally:
            self._stream.close()
            self._ioloop.close()
        if self._error is not None:
            raise self._error

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap a loop callback: any failure ends the session cleanly instead of the loop."""

        def guarded(*args: object) -> None:
            try:
                fn(*args)
            except RelayError as err:
                self._fail(err)
            except Exception as exc:
                log.exception("internal error")
                self._fail(RelayError(f"internal error: {type(exc).__name__}: {exc}"))

        return guarded

    # -- broker side ----------------------------------------------------------------------------
    def _on_broker_ready(self) -> None:
        if self._done:
            return
        self._stream.start(
            self.cfg.publication, self._tracker.confirmed, messages=self.cfg.logical_messages
        )
        self._streaming = True
        self._stats.streaming = True
        self._stats.broker_ready = True
        self._pg_fd = self._stream.fileno()
        self._ioloop.add_handler(self._pg_fd, self._guard(self._on_pg_event), READ)
        self._pg_events = READ
        self._ioloop.call_later(TICK, self._guard(self._tick))
        log.info(
            "streaming",
            extra={
                "slot": self.cfg.slot,
                "lsn": str(self._tracker.confirmed),
                "exchange": self.cfg.exchange,
            },
        )
        self._update_reading()
        if self._stopping:
            self._request_stop()

    def _on_confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        if self._done:
            return
        if not ack:
            self._stats.nacked += 1
            self._tracker.nack(tag, multiple)
            self._fail(
                Nacked(
                    "broker nacked a message (queue full or internal error); will retry",
                    slot=self.cfg.slot,
                    delivery_tag=tag,
                )
            )
            return
        tracker = self._tracker
        before = tracker.in_flight
        tracker.ack(tag, multiple)
        done = before - tracker.in_flight
        self.confirmed += done
        stats = self._stats
        stats.confirmed += done
        stats.in_flight = tracker.in_flight
        now = time.time()
        stats.last_progress = now
        samples = self._latency_samples
        through = tracker.acked_through
        if samples and samples[0][0] <= through:
            sent = 0.0
            while samples and samples[0][0] <= through:
                sent = samples.popleft()[1]
            self._telemetry.metrics.confirm_latency.observe(time.monotonic() - sent)
        if self._tracing.enabled:
            spans = self._unconfirmed_spans
            while spans and spans[0][0] <= through:
                spans.popleft()[1].add_event(EVENT_CONFIRM)
        if self._window < self.cfg.max_in_flight and self.confirmed >= self.cfg.max_in_flight:
            self._window = self.cfg.max_in_flight
            log.info("careful mode over: the broker accepts again", extra={"slot": self.cfg.slot})
        if self._backpressured and self._tracker.in_flight <= self._window // 2:
            self._backpressured = False
            self._update_reading()
        self._progress()
        self._maybe_finish()

    def _on_broker_closed(self) -> None:
        if self._done:
            self._ioloop.stop()

    # -- replication side -----------------------------------------------------------------------
    def _on_pg_event(self, _fd: int, events: int) -> None:
        if events & WRITE:
            self._write_pending = self._stream.flush()
            self._update_events()
        if events & READ and self._reading:
            self._stream.consume()
            self._drain()

    @property
    def _reading(self) -> bool:
        return self._streaming and not (self._done or self._read_stopped or self._backpressured)

    def _drain(self) -> None:
        stream = self._stream
        self._stats.last_progress = time.time()
        while self._reading:
            data = stream.read()
            if data is None:
                return
            self._on_copy_data(data)

    def _on_copy_data(self, data: memoryview) -> None:
        frame = parse_copy_data(data)
        tracker = self._tracker
        self._stats.server_wal_end = max(self._stats.server_wal_end, frame.wal_end)
        if isinstance(frame, PrimaryKeepalive):
            tracker.received(frame.wal_end)
            if tracker.keepalive(frame.wal_end):
                self._progress()
            if frame.reply_requested:
                self._send_status()
            return
        tracker.received(frame.data_start)
        msg = decode(frame.payload)
        if isinstance(msg, Insert):
            event = self._mapper.event(msg, frame.data_start)
            if event is not None:
                self._publish(event)
        elif isinstance(msg, Begin):
            tracker.begin()
            self._tx = TransactionInfo(msg.xid, msg.final_lsn, msg.commit_time)
            self._tx_events = 0
        elif isinstance(msg, Commit):
            tracker.commit(msg.end_lsn)
            if self._tx_events and self._tx is not None:
                self._pending_commits.append((msg.end_lsn, self._tx.committed_at.timestamp()))
                if self._stats.oldest_unconfirmed_commit is None:
                    self._stats.oldest_unconfirmed_commit = self._pending_commits[0][1]
            if self._open_spans:
                self._span_txns.append((msg.end_lsn, self._open_spans))
                self._open_spans = []
            self._tx = None
            if self._stopping:
                self._read_stopped = True
                self._update_reading()
            self._progress()
            self._maybe_finish()
        elif isinstance(msg, Relation):
            self._mapper.relation(msg)
        elif isinstance(msg, Truncate) and any(
            self._mapper.is_outbox_oid(oid) for oid in msg.relation_oids
        ):
            log.info("outbox truncated; no events", extra={"lsn": str(frame.data_start)})
        elif isinstance(msg, Message):
            event = self._mapper.message_event(msg)
            if event is not None and self._tx is not None:
                self._publish(event)
            else:
                self._stats.ignored_messages += 1
                log.debug(
                    "logical message ignored",
                    extra={
                        "prefix": msg.prefix,
                        "transactional": msg.transactional,
                        "lsn": str(msg.lsn),
                        "ignored_total": self._stats.ignored_messages,
                    },
                )
        # Update, Delete, Type, Origin: no events

    def _publish(self, event: OutboxEvent) -> None:
        tx = self._tx
        if tx is None:
            raise RelayError("outbox event outside a transaction", lsn=event.lsn)
        assert self._builder is not None
        out = self._builder.build(event, tx)
        if len(out.body) > self.cfg.max_message_size:
            out = self._dead_letter(event, tx, out)
        tracker = self._tracker
        tag = tracker.publish()
        if self._tracing.enabled:
            span, traceparent = self._tracing.start_publish(
                out.exchange,
                out.routing_key,
                out.message_id,
                event.traceparent,
                str(event.lsn),
                tx.xid,
                self.cfg.slot,
            )
            out.headers["traceparent"] = traceparent
            self._open_spans.append(span)
            self._unconfirmed_spans.append((tag, span))
        self._publisher.publish(out)
        self._tx_events += 1
        stats = self._stats
        stats.published += 1
        stats.in_flight = tracker.in_flight
        if not tag & 15:
            self._latency_samples.append((tag, time.monotonic()))
        if tracker.in_flight >= self._window:
            self._backpressured = True
            self._update_reading()

    def _dead_letter(
        self, event: OutboxEvent, tx: TransactionInfo, out: OutgoingMessage
    ) -> OutgoingMessage:
        """An event the broker can never accept: divert it, with its own confirm, or halt."""
        reason = (
            f"message of {len(out.body)} bytes exceeds max_message_size {self.cfg.max_message_size}"
        )
        if not self.cfg.dead_letter_exchange:
            raise BrokerRefused(
                f"{reason}: set dead_letter_exchange to divert such events, or raise the "
                "broker's max_message_size and this setting",
                event_id=event.id,
                lsn=event.lsn,
            )
        assert self._builder is not None
        stub = self._builder.build(msgspec.structs.replace(event, payload=None, headers=None), tx)
        self._stats.dead_lettered += 1
        log.error(
            "event dead-lettered: payload omitted",
            extra={
                "event_id": event.id,
                "lsn": str(event.lsn),
                "size": len(out.body),
                "dead_letter_exchange": self.cfg.dead_letter_exchange,
                "dead_lettered_total": self._stats.dead_lettered,
            },
        )
        return dataclasses.replace(
            stub,
            exchange=self.cfg.dead_letter_exchange,
            headers={
                **stub.headers,
                "x-cdc-relay-reason": reason,
                "x-original-exchange": out.exchange,
                "x-original-routing-key": out.routing_key,
                "x-source-lsn": str(event.lsn),
            },
        )

    def _on_unroutable_count(self, queue: str, count: int) -> None:
        if count > self._stats.unroutable.get(queue, 0):
            log.warning(
                "unroutable events kept in the alternate exchange's queue: no binding matched",
                extra={"queue": queue, "count": count},
            )
        self._stats.unroutable[queue] = count

    def _update_reading(self) -> None:
        want = READ if self._reading else 0
        if want and not self._pg_events & READ:
            # libpq may hold complete messages already read from the socket
            self._pg_events |= READ
            self._update_events()
            self._drain()
            return
        if not want:
            self._pg_events &= ~READ
        self._update_events()

    def _update_events(self) -> None:
        if not self._streaming or self._done:
            return
        events = (self._pg_events & READ) | (WRITE if self._write_pending else 0)
        self._pg_events = events
        self._ioloop.update_handler(self._pg_fd, events)

    # -- checkpoint reporting --------------------------------------------------------------------
    def _progress(self) -> None:
        """Report a moved confirmed point soon, batching bursts of acks into one update."""
        pending = self._pending_commits
        if pending and pending[0][0] <= self._tracker.confirmed:
            confirmed = self._tracker.confirmed
            now = time.time()
            histogram = self._telemetry.metrics.commit_to_confirm
            latency = 0.0
            while pending and pending[0][0] <= confirmed:
                latency = now - pending.popleft()[1]
                histogram.observe(latency)
            self._stats.oldest_unconfirmed_commit = pending[0][1] if pending else None
            self._telemetry.alert.check(latency)
        if self._tracker.confirmed > self._reported and self._flush_timer is None:
            self._flush_timer = self._ioloop.call_later(
                self.cfg.flush_delay, self._guard(self._flush_due)
            )

    def _flush_due(self) -> None:
        self._flush_timer = None
        self._send_status()
        if not self.healthy and self.confirmed:
            self.healthy = True

    def _tick(self) -> None:
        """Once a second: liveness, alerts, and the periodic status update when it is due.

        While reading is paused (window full, broker blocked) the relay cannot see the
        server's reply requests, so an update is due every second then, whatever
        ``status_interval`` says: the walsender must never time out because the broker is slow.
        """
        if self._done:
            return
        failpoints.wedge("loop.wedge")
        now = time.monotonic()
        self._stats.last_loop_tick = time.time()
        self._telemetry.alert.check()
        interval = (
            self.cfg.status_interval if self._reading else min(self.cfg.status_interval, TICK)
        )
        if now - self._last_status >= interval - 0.05:
            self._send_status()
        if now - self._last_unroutable_check >= self.cfg.status_interval:
            self._last_unroutable_check = now
            self._publisher.count_unroutable(self._guard(self._on_unroutable_count))
        self._ioloop.call_later(TICK, self._guard(self._tick))

    def _send_status(self) -> None:
        if not self._streaming or self._done:
            return
        try:
            flush = self._tracker.confirmed
            self._write_pending = self._stream.send(
                standby_status_update(self._tracker.written, flush, flush, pg_now_us())
            )
            self._reported = flush
            self._last_status = time.monotonic()
            self._stats.last_status_update = time.time()
            self._stats.confirmed_lsn = flush
            if self._span_txns:
                self._end_spans(flush)
            self._update_events()
            log.debug("status update", extra={"slot": self.cfg.slot, "lsn": str(flush)})
        except RelayError as err:
            self._fail(err)

    def _end_spans(self, flush: int) -> None:
        """A transaction's spans end when PostgreSQL has been told its WAL may go."""
        txns = self._span_txns
        while txns and txns[0][0] <= flush:
            for span in txns.popleft()[1]:
                span.add_event(EVENT_FLUSH, {"cdc_relay.flush_lsn": str(Lsn(flush))})
                span.end()

    # -- stopping ----------------------------------------------------------------------------------
    def _on_stop_signal(self, _fd: int, _events: int) -> None:
        self._stop.drain()
        if self._stop.requested:
            self._request_stop()

    def _request_stop(self) -> None:
        if self._done:
            return
        if not self._stopping:
            self._stopping = True
            log.info(
                "stopping: finishing the open transaction and waiting for confirms",
                extra={"in_flight": self._tracker.in_flight},
            )
            self._ioloop.call_later(self.cfg.stop_timeout, self._guard(self._stop_timeout))
        if not self._streaming:
            self._shutdown()
            return
        if not self._tracker.in_transaction:
            self._read_stopped = True
            self._update_reading()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if (
            self._stopping
            and self._read_stopped
            and self._tracker.in_flight == 0
            and not self._done
        ):
            log.info(
                "halted" if self._error else "stopped cleanly",
                extra={"slot": self.cfg.slot, "lsn": str(self._tracker.confirmed)},
            )
            self._shutdown()

    def _stop_timeout(self) -> None:
        if self._done:
            return
        log.warning(
            "stop timeout: unconfirmed events will be sent again on restart",
            extra={"in_flight": self._tracker.in_flight, "lsn": str(self._tracker.confirmed)},
        )
        self._shutdown()

    def _fail(self, err: RelayError) -> None:
        if self._error is None and not self._done:
            self._error = err
            if isinstance(err, Nacked) and "returned" in err.message:
                self._stats.returned += 1
        if (
            not err.retryable
            and self._streaming
            and self._publisher.ready  # confirms can still arrive
            and not self._tracker.failed
            and not self._done
        ):
            self._halt()
            return
        self._tracker.fail()
        self._shutdown()

    def _halt(self) -> None:
        """A data error retrying cannot fix: stop reading before the bad event, but let the
        broker confirm everything already sent, so the restart after the fix replays little."""
        log.error(
            "halting: waiting for confirms of the events before the failing one",
            extra={"in_flight": self._tracker.in_flight, "slot": self.cfg.slot},
        )
        self._stopping = True
        self._read_stopped = True
        self._update_reading()
        self._ioloop.call_later(self.cfg.stop_timeout, self._guard(self._stop_timeout))
        self._maybe_finish()

    def _shutdown(self) -> None:
        """Report what is safe, close both sides, and let ``run`` return."""
        if self._done:
            return
        self._done = True
        self._stats.streaming = False
        self._stats.broker_ready = False
        for span in self._open_spans + [s for _, spans in self._span_txns for s in spans]:
            span.set_attribute("cdc_relay.flushed", False)  # will be sent again after restart
            span.end()
        self._open_spans = []
        self._span_txns.clear()
        if self._streaming:
            # the tracker froze on failure, so this only ever reports confirmed events
            with contextlib.suppress(RelayError):  # best effort: the server may be gone
                flush = self._tracker.confirmed
                self._stream.send_final(
                    standby_status_update(self._tracker.written, flush, flush, pg_now_us())
                )
                self._reported = flush
            # libpq may already have closed the socket after a dropped connection: the poller
            # then refuses to unregister it (EBADF), and the kernel has forgotten it anyway
            with contextlib.suppress(OSError):
                self._ioloop.remove_handler(self._pg_fd)
        self._stream.close()
        self._ioloop.call_later(FORCED_EXIT_GRACE, self._ioloop.stop)
        self._publisher.close()


class Relay:
    """Runs sessions until stopped; retryable failures back off, others end the process."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop = StopSignal()
        self._failures = 0
        self._careful = False
        self._backoff = tenacity.wait_exponential_jitter(
            initial=cfg.reconnect_min, max=cfg.reconnect_max
        )
        self.telemetry = Telemetry.create(cfg.slot, cfg.alert_latency, tracing_requested())

    def _wait(self, state: tenacity.RetryCallState) -> float:
        # tenacity counts every attempt; a session that streamed fine restarts the backoff
        counted = copy.copy(state)
        counted.attempt_number = max(1, self._failures)
        return float(self._backoff(counted))

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        if isinstance(err, SlotBusy):
            log.warning(
                "standby: another connection holds the slot; retrying",
                extra={
                    "error": str(err),
                    "retry_in_s": round(state.upcoming_sleep, 2),
                    "slot": self.cfg.slot,
                },
            )
            return
        log.warning(
            "retrying after failure",
            extra={
                "error": str(err),
                "retry_in_s": round(state.upcoming_sleep, 2),
                "slot": self.cfg.slot,
            },
        )

    def _sleep(self, seconds: float) -> None:
        """Back off, interruptibly; a standby waiting here is alive, so keep /healthz green."""
        stats = self.telemetry.stats
        deadline = time.monotonic() + seconds
        while not self.stop.requested:
            now = time.time()
            stats.last_loop_tick = stats.last_progress = now
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 1.0))

    def _session(self) -> None:
        session = Session(self.cfg, self.stop, careful=self._careful, telemetry=self.telemetry)
        try:
            session.run()
        except RelayError as err:
            if err.retryable:
                self.telemetry.stats.reconnects[_side(err)] += 1
            self._failures = 1 if session.healthy else self._failures + 1
            self._careful = isinstance(err, Nacked) or (session.careful and not session.healthy)
            raise

    def run(self) -> int:
        self.stop.install()
        health = None
        if self.cfg.http_address:
            health = HealthServer(
                self.cfg.http_address,
                self.telemetry.stats,
                self.telemetry.metrics,
                self.cfg.health_timeout,
            ).start()
        try:
            return self._run()
        finally:
            if health is not None:
                health.stop()
            self.telemetry.tracing.shutdown()

    def _run(self) -> int:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, RelayError) and e.retryable),
            wait=self._wait,
            stop=lambda _s: self.stop.requested,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            retrying(self._session)
        except RelayError as err:
            if self.stop.requested and err.retryable:
                return 0
            log.error(str(err), extra={"retryable": err.retryable, "slot": self.cfg.slot})
            return 1
        return 0


def _side(err: RelayError) -> str:
    """Which connection a failure came from, for the reconnect counter."""
    text = err.message
    if isinstance(err, PublishFailed) or "RabbitMQ" in text or "broker" in text:
        return "rabbitmq"
    return "postgres"
