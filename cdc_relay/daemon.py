"""The I/O driver: one event loop that owns the replication socket and the AMQP connection.

A *session* is one replication connection plus one AMQP connection. Every decision is made by
the sans-I/O ``Pipeline``; this module only feeds it what the sockets say and performs the
effects it answers with (publish, status update, pause/resume reading, finish). Any failure ends
the whole session: the relay closes both sides, backs off, and resumes from the slot — the slot's
confirmed position is the only state that survives, which is what makes a crash at any point safe
(DESIGN.md, the checkpoint rule).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable

from pika.adapters.select_connection import IOLoop, PollEvents

from cdc_relay import backfill, catalog, failpoints, ledger
from cdc_relay.brokers import Brokers
from cdc_relay.config import Config
from cdc_relay.errors import (
    POSTGRES,
    ConnectionLost,
    InternalError,
    RelayError,
    SetupError,
    SlotBusy,
)
from cdc_relay.health import HealthServer
from cdc_relay.ledger import LedgerWriter
from cdc_relay.lsn import Lsn
from cdc_relay.messages import MessageBuilder
from cdc_relay.outbox import OutboxColumns, OutboxMapper
from cdc_relay.pipeline import (
    TICK,
    Acked,
    Committed,
    Delivered,
    Effect,
    Finish,
    Outcome,
    PauseReading,
    Pipeline,
    Progressed,
    Publish,
    ResumeReading,
    ScheduleFlush,
    ScheduleStopTimeout,
    SendStatus,
)
from cdc_relay.postgres import ReplicationStream
from cdc_relay.rabbitmq import Publisher
from cdc_relay.replication import pg_now_us, standby_status_update
from cdc_relay.signals import StopSignal
from cdc_relay.telemetry import SessionObserver, Telemetry, tracing_requested

log = logging.getLogger("cdc_relay")

READ = PollEvents.READ
WRITE = PollEvents.WRITE
FORCED_EXIT_GRACE = 5.0  # seconds a closing session may take before the loop is stopped anyway
FINAL_STATUS_TIMEOUT = 2.0  # the last status update is best effort: the slot is merely behind
START_TIMEOUT = 30.0  # seconds START_REPLICATION may take to answer
DRAIN_BATCH = 512  # effects performed together at most: bounds a drain's memory and latency


class PublicationWatch:
    """Re-checks the publication from a worker thread and posts the verdict to the loop.

    The check opens its own short-lived connection, which may take seconds when the server is
    unreachable; on the loop that would stall heartbeats and confirms, so it runs beside it.
    """

    def __init__(
        self,
        cfg: Config,
        post: Callable[[Callable[[], None]], None],
        confirmed: Callable[[], tuple[int, float] | None] = lambda: None,
    ) -> None:
        self._cfg = cfg
        self._post = post
        self._confirmed = confirmed  # the newest confirmed commit, recorded for `recover`
        self._recorded: tuple[int, float] | None = None
        self._recorded_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publication-watch", daemon=True)
        self.on_checked: Callable[[Lsn], None] = lambda _lsn: None
        # called from this thread: it only stores a reading for /metrics
        self.on_slot_wal: Callable[[tuple[int, int] | None], None] = lambda _wal: None
        self.on_drift: Callable[[RelayError], None] = lambda _err: None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        check = catalog.PublicationCheck(self._cfg)
        try:
            while not self._stop.is_set():
                try:
                    watermark = check.watermark()
                except SetupError as err:
                    self._post(functools.partial(self.on_drift, err))
                    return
                except ConnectionLost as err:
                    log.warning("publication check skipped", extra={"error": str(err)})
                except Exception as exc:  # a bug here must not kill the thread silently
                    log.error("publication check failed", exc_info=exc)
                else:
                    self._post(functools.partial(self.on_checked, watermark))
                    self._record_confirmed(check)
                    self._read_slot_wal(check)
                self._stop.wait(self._cfg.publication_check_interval)
        finally:
            check.close()

    def _read_slot_wal(self, check: catalog.PublicationCheck) -> None:
        try:
            self.on_slot_wal(check.slot_wal())
        except RelayError as err:
            log.warning("could not read the slot's WAL", extra={"error": str(err)})

    def _record_confirmed(self, check: catalog.PublicationCheck) -> None:
        """Now and then, note the newest confirmed commit in the publication's comment: after
        a slot is lost, it tells `recover --since` how far back to go."""
        confirmed = self._confirmed()
        now = time.monotonic()
        if (
            confirmed is None
            or confirmed == self._recorded
            or now - self._recorded_at < catalog.CONFIRMED_RECORD_INTERVAL
        ):
            return
        self._recorded, self._recorded_at = confirmed, now
        try:
            check.record_confirmed(Lsn(confirmed[0]), confirmed[1])
        except RelayError as err:
            log.warning("could not record the confirmed position", extra={"error": str(err)})


class Session:
    """One streaming session; ``run`` returns on a graceful stop and raises on failure."""

    def __init__(
        self,
        cfg: Config,
        stop: StopSignal,
        careful: bool = False,
        telemetry: Telemetry | None = None,
        allow_create: bool | None = None,
        own_pids: tuple[int, ...] = (),
        ledger: LedgerWriter | None = None,
        brokers: Brokers | None = None,
    ) -> None:
        self.cfg = cfg
        self._stop = stop
        self._ledger = ledger
        self._careful = careful
        self._allow_create = cfg.create_slot if allow_create is None else allow_create
        self._own_pids = own_pids
        self._telemetry = telemetry or Telemetry.create(cfg.slot, cfg.alert_latency, False)
        self._stats = self._telemetry.stats
        self._observer = SessionObserver(self._telemetry, cfg.slot)
        self._ioloop = IOLoop()
        self._stream = ReplicationStream(cfg.pg_dsn, cfg.slot)
        self._routes = {f"{s}.{t}": cfg.route(s, t) for s, t in cfg.tables}
        self._publisher = Publisher(
            brokers or Brokers(cfg.amqp_url, cfg.amqp_shuffle),
            [cfg.exchange, *(exchange for exchange, _ in self._routes.values())],
            cfg.exchange_type,
            cfg.declare_exchange,
            cfg.amqp_heartbeat,
            self._ioloop,
            on_ready=self._guard(self._on_broker_ready),
            on_confirm=self._guard(self._on_confirm),
            on_failure=self._guard(self._on_failure),
            on_closed=self._on_broker_closed,
            alternate_exchange=cfg.alternate_exchange,
            unroutable_queue_type=cfg.unroutable_queue_type,
            dead_letter_exchange=cfg.dead_letter_exchange,
        )
        self._watch = PublicationWatch(cfg, self._post, lambda: self._stats.confirmed_commit)
        self.pipeline: Pipeline | None = None
        self.slot_seen = False  # prepare() found (or made) the slot: never create it again
        self.backend_pid: int | None = None
        self._pg_fd = -1
        self._pg_events = 0
        self._starting = False  # START_REPLICATION sent, not answered yet
        self._streaming = False
        self._closed = False
        self._write_pending = False
        self._drain_wanted = False
        self._last_unroutable_check = 0.0
        self._ignored_before = self._stats.ignored_messages

    # -- entry point ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        cfg = self.cfg
        start = catalog.prepare(cfg, allow_create=self._allow_create, own_pids=self._own_pids)
        self.slot_seen = True
        try:
            info = self._stream.connect()
            self.backend_pid = self._stream.backend_pid
            columns = OutboxColumns(
                **{k: cfg.columns(k) for k in OutboxColumns.__dataclass_fields__}
            )
            mapper = OutboxMapper(cfg.tables, columns, message_prefix=cfg.message_prefix)
            builder = MessageBuilder(
                cfg.slot,
                info.dbname,
                cfg.routing_key,
                cfg.exchange,
                self._routes,
                columns=columns,
                message_prefix=cfg.message_prefix,
            )
            observer = self._observer
            self.pipeline = Pipeline(
                cfg,
                start,
                mapper,
                builder,
                careful=self._careful,
                trace=observer.trace if observer.tracing else None,
            )
            self._ioloop.add_handler(self._stop.fileno(), self._guard(self._on_stop_signal), READ)
            self._publisher.connect()
            if self._stop.requested:
                self._ioloop.add_callback_threadsafe(self._guard(self._on_stop))
            self._ioloop.start()
        finally:
            self._watch.stop()
            self._stream.close()
            self._ioloop.close()
        outcome = self.outcome
        if outcome.error is not None:
            raise outcome.error
        return outcome

    @property
    def outcome(self) -> Outcome:
        if self.pipeline is None:
            return Outcome(healthy=False, careful=self._careful, error=None)
        return self.pipeline.outcome()

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap a loop callback: any failure ends the session cleanly instead of the loop."""

        def guarded(*args: object) -> None:
            try:
                fn(*args)
            except RelayError as err:
                self._fail(err)
            except Exception as exc:
                log.error("internal error", exc_info=exc)
                self._fail(InternalError(f"internal error: {type(exc).__name__}: {exc}"))

        return guarded

    def _fail(self, err: RelayError) -> None:
        if self.pipeline is None:
            raise err
        self._apply(self.pipeline.failure(err))

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (from the publication watch)."""
        if not self._closed:
            # the loop may close between the check and the call: the session is over anyway
            with contextlib.suppress(Exception):
                self._ioloop.add_callback_threadsafe(self._guard(fn))

    # -- effects --------------------------------------------------------------------------------
    def _apply(self, effects: list[Effect]) -> None:
        """Perform what the pipeline decided, in order; nothing here decides anything."""
        observer = self._observer
        for effect in effects:
            if self._closed:
                return
            # isinstance narrows for the type checker and is one test per effect kind
            if isinstance(effect, Publish):
                try:
                    self._publisher.publish(effect.message)
                except RelayError as err:
                    self._fail(err)
                    return
                pipeline = self._pipeline
                observer.on_publish(effect, pipeline.tracker.in_flight, pipeline.bytes_in_flight)
            elif isinstance(effect, Acked):
                pipeline = self._pipeline
                observer.on_acked(effect, pipeline.tracker.in_flight, pipeline.bytes_in_flight)
            elif isinstance(effect, SendStatus):
                self._send_status(effect)
            elif isinstance(effect, Progressed):
                observer.on_progress()
            elif isinstance(effect, Committed):
                observer.on_committed(effect)
            elif isinstance(effect, Delivered):
                if self._ledger is not None:
                    self._ledger.put(effect)
            elif isinstance(effect, PauseReading):
                self._set_reading(False)
            elif isinstance(effect, ResumeReading):
                self._set_reading(True)
                self._drain_wanted = True
            elif isinstance(effect, ScheduleFlush):
                self._ioloop.call_later(effect.delay, self._guard(self._on_flush_due))
            elif isinstance(effect, ScheduleStopTimeout):
                self._ioloop.call_later(effect.delay, self._guard(self._on_stop_timeout))
            elif isinstance(effect, Finish):
                self._finish(effect)
                return
        if self._drain_wanted and not self._closed:
            self._drain_wanted = False
            self._drain()

    def _send_status(self, effect: SendStatus) -> None:
        # fault tests: report no flush position at all (the server then keeps the slot)
        flush = Lsn(0) if failpoints.enabled("status.no_flush") else effect.flush
        self._write_pending = self._stream.send(
            standby_status_update(effect.write, flush, flush, pg_now_us(), effect.reply_requested)
        )
        self._observer.on_status(effect)
        self._update_events()
        log.debug("status update", extra={"slot": self.cfg.slot, "lsn": str(effect.flush)})

    def _finish(self, effect: Finish) -> None:
        """Report what is safe, close both sides, and let ``run`` return."""
        self._closed = True
        self._watch.stop()
        if effect.error is not None:
            side = effect.error.side or "relay"
            log.debug("session ending", extra={"error": str(effect.error), "side": side})
        if effect.final_flush is not None and self._streaming:
            flush = effect.final_flush
            sent = False
            with contextlib.suppress(RelayError):  # best effort: the server may be gone
                sent = self._stream.send_final(
                    standby_status_update(effect.write, flush, flush, pg_now_us()),
                    FINAL_STATUS_TIMEOUT,
                )
            if not sent:
                log.warning(
                    "final status update not sent: the slot stays at its last reported point",
                    extra={"slot": self.cfg.slot, "lsn": str(flush)},
                )
        self._observer.on_finish(effect)
        if self._pg_fd >= 0:
            # libpq may already have closed the socket after a dropped connection: the poller
            # then refuses to unregister it (EBADF), and the kernel has forgotten it anyway
            with contextlib.suppress(OSError):
                self._ioloop.remove_handler(self._pg_fd)
            self._pg_fd = -1
        self._stream.close()
        self._ioloop.call_later(FORCED_EXIT_GRACE, self._ioloop.stop)
        self._publisher.close()

    # -- broker side ----------------------------------------------------------------------------
    def _on_broker_ready(self) -> None:
        if self._closed or self.pipeline is None:
            return
        self._stats.broker_ready = True
        self._stats.broker = self._publisher.address
        self._apply(self.pipeline.broker_ready(self._publisher.frame_max))
        self._stream.start_async(
            self.cfg.publication,
            self.pipeline.tracker.confirmed,
            messages=self.cfg.logical_messages,
        )
        self._starting = True
        self._pg_fd = self._stream.fileno()
        self._pg_events = READ
        self._ioloop.add_handler(self._pg_fd, self._guard(self._on_pg_event), READ)
        self._ioloop.call_later(START_TIMEOUT, self._guard(self._on_start_timeout))

    def _on_confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        if self._closed or self.pipeline is None:
            return
        self._apply(self.pipeline.ack(tag, multiple) if ack else self.pipeline.nack(tag, multiple))

    def _on_failure(self, err: RelayError) -> None:
        if self._closed:
            return
        self._fail(err)

    def _on_broker_closed(self) -> None:
        if self._closed:
            self._ioloop.stop()

    # -- replication side -----------------------------------------------------------------------
    def _on_start_timeout(self) -> None:
        if self._starting and not self._closed:
            self._fail(
                ConnectionLost(
                    f"START_REPLICATION got no answer within {START_TIMEOUT:.0f} s",
                    side=POSTGRES,
                    slot=self.cfg.slot,
                )
            )

    def _on_pg_event(self, _fd: int, events: int) -> None:
        if self._closed:
            return
        if events & WRITE:
            self._write_pending = self._stream.flush()
            self._update_events()
        if not events & READ:
            return
        if self._starting:
            if not self._stream.poll_start():
                return
            self._started()
        if self.pipeline is not None and self.pipeline.reading:
            self._stream.consume()
            self._drain()

    def _started(self) -> None:
        assert self.pipeline is not None
        self._starting = False
        self._streaming = True
        self._stats.streaming = True
        log.info(
            "streaming",
            extra={
                "slot": self.cfg.slot,
                "lsn": str(self.pipeline.tracker.confirmed),
                "exchange": self.cfg.exchange,
            },
        )
        self._ioloop.call_later(TICK, self._guard(self._tick))
        self._watch.on_checked = lambda w: self._apply(self._pipeline.publication_checked(w))
        self._watch.on_slot_wal = functools.partial(setattr, self._stats, "slot_wal")
        self._watch.on_drift = lambda err: self._apply(self._pipeline.publication_drifted(err))
        self._watch.start()
        self._apply(self.pipeline.streaming_started(time.monotonic()))

    @property
    def _pipeline(self) -> Pipeline:
        assert self.pipeline is not None
        return self.pipeline

    def _drain(self) -> None:
        """Hand every complete message libpq holds to the pipeline, while it wants them."""
        pipeline = self._pipeline
        stream = self._stream
        now = time.monotonic()
        # effects of a whole drain are performed together (publishes leave in one write); the
        # pipeline stops reading by itself (pause, halt, finish), so nothing waits on them
        effects: list[Effect] = []
        publisher = self._publisher
        publisher.hold()
        try:
            while pipeline.reading:
                data = stream.read()
                if data is None:
                    break
                effects += pipeline.copy_data(data, now)
                if len(effects) >= DRAIN_BATCH:
                    self._apply(effects)
                    effects = []
                    publisher.release()  # a long drain writes as it goes
                    if self._closed:
                        return
                    publisher.hold()
        finally:
            stats = self._stats
            stats.server_wal_end = max(stats.server_wal_end, pipeline.server_wal_end)
            stats.ignored_messages = self._ignored_before + pipeline.ignored_messages
            # also when reading failed: what was decided before the failure is still performed
            try:
                self._apply(effects)
            finally:
                publisher.release()

    def _set_reading(self, on: bool) -> None:
        if on:
            self._pg_events |= READ
        else:
            self._pg_events &= ~READ
        self._update_events()

    def _update_events(self) -> None:
        if self._pg_fd < 0 or self._closed:
            return
        events = (self._pg_events & READ) | (WRITE if self._write_pending else 0)
        self._ioloop.update_handler(self._pg_fd, events)

    # -- timers ---------------------------------------------------------------------------------
    def _on_flush_due(self) -> None:
        if not self._closed:
            self._apply(self._pipeline.flush_due())

    def _on_stop_timeout(self) -> None:
        if not self._closed:
            self._apply(self._pipeline.stop_timeout())

    def _tick(self) -> None:
        """Once a second: liveness for /healthz, the alert, and whatever the pipeline wants."""
        if self._closed:
            return
        failpoints.wedge("loop.wedge")
        self._stats.last_loop_tick = time.time()
        self._telemetry.alert.check()
        now = time.monotonic()
        if now - self._last_unroutable_check >= self.cfg.status_interval:
            self._last_unroutable_check = now
            self._publisher.count_unroutable(self._guard(self._on_unroutable_count))
        self._ioloop.call_later(TICK, self._guard(self._tick))
        self._apply(self._pipeline.tick(now))

    def _on_unroutable_count(self, queue: str, count: int) -> None:
        if count > self._stats.unroutable.get(queue, 0):
            log.warning(
                "unroutable events kept in the alternate exchange's queue: no binding matched",
                extra={"queue": queue, "count": count},
            )
        self._stats.unroutable[queue] = count

    # -- stopping -------------------------------------------------------------------------------
    def _on_stop_signal(self, _fd: int, _events: int) -> None:
        self._stop.drain()
        if self._stop.requested:
            self._on_stop()

    def _on_stop(self) -> None:
        if self._closed or self.pipeline is None:
            return
        if self._starting:
            # START_REPLICATION is still on its way: nothing was read, so nothing is owed
            self._starting = False
        self._apply(self.pipeline.stop_requested())


class Relay:
    """Runs sessions until stopped; retryable failures back off, others end the process."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop = StopSignal()
        self._failures = 0
        self._careful = False
        self._slot_seen = False
        self._own_pids: tuple[int, ...] = ()
        self._backfilled = False
        self.telemetry = Telemetry.create(cfg.slot, cfg.alert_latency, tracing_requested())
        self._ledger: LedgerWriter | None = None
        # the nodes of amqp_url: successive sessions rotate over them
        self._brokers = Brokers(cfg.amqp_url, cfg.amqp_shuffle)

    def backoff(self) -> float:
        """Exponential with jitter; a session that made progress starts it afresh."""
        cfg = self.cfg
        base = min(cfg.reconnect_max, cfg.reconnect_min * 2.0 ** max(0, self._failures - 1))
        return min(cfg.reconnect_max, base * random.uniform(0.5, 1.0) + cfg.reconnect_min / 2)  # noqa: S311

    def _sleep(self, seconds: float, standby: bool) -> None:
        """Back off, interruptibly. A standby waiting here is alive and well, so it keeps
        /healthz green; any other retry is not progress."""
        stats = self.telemetry.stats
        deadline = time.monotonic() + seconds
        while not self.stop.requested:
            now = time.time()
            stats.last_loop_tick = now
            if standby:
                stats.last_progress = now
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 1.0))

    def _backfill(self) -> bool:
        """Finish (or, with create_slot and backfill, start) the slot's backfill before
        streaming it; False when a stop request interrupted it."""
        if self._backfilled:
            return True
        stats = self.telemetry.stats
        last = [0.0]

        def progress(p: backfill.Progress) -> None:
            now = time.time()
            stats.last_loop_tick = stats.last_progress = now  # a backfill is progress
            if now - last[0] >= 5.0 or not p.table:
                last[0] = now
                log.info(
                    "backfill progress",
                    extra={"slot": self.cfg.slot, "rows": p.rows, "total": p.total},
                )

        result = backfill.before_streaming(
            self.cfg,
            allow_create=self.cfg.create_slot and not self._slot_seen,
            stop=self.stop,
            progress=progress,
        )
        if result is not None:
            for line in result.lines:
                log.info(line, extra={"slot": self.cfg.slot})
            if not result.complete:
                return False
        self._backfilled = True
        return True

    def _session(self) -> Outcome:
        if not self._backfill():
            return Outcome(healthy=True, careful=self._careful, error=None)
        if self.cfg.ledger and self._ledger is None:
            with catalog.connect(self.cfg) as conn, catalog.sql_errors(self.cfg, "the ledger"):
                ledger.setup(conn, self.cfg)
            self._ledger = LedgerWriter(self.cfg, self.telemetry.stats).start()
        session = Session(
            self.cfg,
            self.stop,
            careful=self._careful,
            telemetry=self.telemetry,
            allow_create=self.cfg.create_slot and not self._slot_seen,
            own_pids=self._own_pids,
            ledger=self._ledger,
            brokers=self._brokers,
        )
        try:
            return session.run()
        finally:
            self._slot_seen = self._slot_seen or session.slot_seen
            if session.backend_pid is not None:
                self._own_pids = (*self._own_pids[-3:], session.backend_pid)
            outcome = session.outcome
            self._careful = outcome.careful
            stats = self.telemetry.stats
            if outcome.healthy:
                self._failures = 0
                stats.consecutive_failures = 0

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
            if self._ledger is not None:
                self._ledger.close()
            if health is not None:
                health.stop()
            self.telemetry.tracing.shutdown()

    def _run(self) -> int:
        stats = self.telemetry.stats
        while True:
            try:
                self._session()
                return 0
            except RelayError as err:
                if not err.retryable:
                    log.error(
                        str(err),
                        extra={"retryable": False, "slot": self.cfg.slot, "side": err.side},
                    )
                    return 1
                if self.stop.requested:
                    return 0
                standby = isinstance(err, SlotBusy)
                if not standby:
                    self._failures += 1
                    stats.failed_sessions += 1
                    stats.consecutive_failures = self._failures
                    stats.reconnects[err.side or POSTGRES] = (
                        stats.reconnects.get(err.side or POSTGRES, 0) + 1
                    )
                delay = self.backoff()
                log.warning(
                    "standby: another connection holds the slot; retrying"
                    if standby
                    else "retrying after failure",
                    extra={
                        "error": str(err),
                        "side": err.side,
                        "retry_in_s": round(delay, 2),
                        "slot": self.cfg.slot,
                        "consecutive_failures": self._failures,
                    },
                )
                self._sleep(delay, standby)
                if self.stop.requested:
                    return 0
