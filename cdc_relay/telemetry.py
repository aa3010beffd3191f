"""Telemetry: Prometheus metrics, OpenTelemetry traces, and the propagation alert.

The hot path stays cheap: the loop bumps plain integers on ``Stats`` and the metrics are
computed from them only when someone scrapes ``/metrics``. Histograms are observed once per
broker ack frame and once per finished transaction, not once per event. Tracing costs one
``if`` per event when it is off; when on, each published event gets a PRODUCER span that is a
child of the outbox row's W3C ``traceparent`` (so an order can be followed from the writing
transaction to the consumer), ends when the checkpoint covering it is reported to PostgreSQL,
and its own ``traceparent`` travels on in the AMQP headers.
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cdc_relay.messages import TransactionInfo
    from cdc_relay.outbox import OutboxEvent
    from cdc_relay.pipeline import Acked, Committed, Finish, Publish, SendStatus

log = logging.getLogger("cdc_relay")

# span and event names operators search for in Jaeger
SPAN_PUBLISH = "publish"  # full name: "publish <exchange>" (messaging semantic conventions)
EVENT_CONFIRM = "broker.confirm"
EVENT_FLUSH = "checkpoint.flush"
TRACER_NAME = "cdc_relay"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Stats:
    """Counters and gauges the event loop updates; plain attributes, read at scrape time."""

    published: int = 0
    confirmed: int = 0
    nacked: int = 0
    returned: int = 0
    dead_lettered: int = 0
    ignored_messages: int = 0
    invalid_events: int = 0
    unroutable: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    in_flight_bytes: int = 0
    failed_sessions: int = 0  # sessions that ended in a failure without moving the slot
    consecutive_failures: int = 0  # the same, since the last session that made progress
    server_wal_end: int = 0
    confirmed_lsn: int = 0
    oldest_unconfirmed_commit: float | None = None  # unix time of the oldest pending commit
    # (end LSN, unix commit time) of the newest transaction whose events are all confirmed
    confirmed_commit: tuple[int, float] | None = None
    # (WAL bytes the slot retains, bytes it may still retain or -1 when unlimited), read with
    # each publication check; None until the first
    slot_wal: tuple[int, int] | None = None
    last_status_update: float = 0.0
    # the confirmed point moved, or the server answered while nothing was owed (idle)
    last_progress: float = field(default_factory=time.time)
    last_loop_tick: float = field(default_factory=time.time)
    streaming: bool = False
    broker_ready: bool = False
    broker: str | None = None  # the RabbitMQ node in use (never a password), for /readyz
    reconnects: dict[str, int] = field(default_factory=lambda: {"postgres": 0, "rabbitmq": 0})
    alert: bool = False
    # ledger = true: rows written, failed writes, rows dropped over the backlog limit, waiting
    ledger_rows: int = 0
    ledger_failures: int = 0
    ledger_dropped: int = 0
    ledger_backlog: int = 0

    def lag_seconds(self, now: float | None = None) -> float:
        if self.oldest_unconfirmed_commit is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.oldest_unconfirmed_commit)


class LoopHistogram(Collector):
    """A histogram that only the event loop writes, exposed like prometheus_client's own.

    prometheus_client's ``Histogram.observe`` takes a lock for the sum and one per bucket it
    passes: about 3 µs, paid once per transaction, which in the common one-event transaction
    is once per event. Here an observation is a bisect and two additions; the scrape thread
    reads plain integers (a scrape may see one observation half-counted, never a torn value).
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._labels = [repr(b) for b in self._bounds]  # "0.005", "5.0": as prometheus_client
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # "le": a value on a bound is in
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = list(self._counts)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for label, n in zip(self._labels, counts, strict=False):
            cumulative += n
            buckets.append((label, cumulative))
        buckets.append(("+Inf", cumulative + counts[-1]))
        yield HistogramMetricFamily(self._name, self._doc, buckets=buckets, sum_value=self._sum)


class Metrics:
    """The registry behind ``/metrics``: histograms plus a collector over ``Stats``."""

    def __init__(self, stats: Stats, slot: str) -> None:
        self.stats = stats
        self.registry = CollectorRegistry(auto_describe=True)
        self.confirm_latency = LoopHistogram(
            "cdc_relay_confirm_latency_seconds",
            "Publish to broker confirm, per ack frame (newest message it confirms)",
            LATENCY_BUCKETS,
        )
        self.commit_to_confirm = LoopHistogram(
            "cdc_relay_commit_to_confirm_seconds",
            "Commit in PostgreSQL to the broker confirming the transaction's last event",
            LATENCY_BUCKETS,
        )
        self.registry.register(self.confirm_latency)
        self.registry.register(self.commit_to_confirm)
        self.registry.register(_StatsCollector(stats, slot))


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, slot: str) -> None:
        self._stats = stats
        self._slot = slot

    def collect(self) -> Iterator[Any]:
        s = self._stats
        now = time.time()
        labels = ["slot"]
        for name, doc, value in (
            ("cdc_relay_events_published", "Events published to the broker", s.published),
            ("cdc_relay_events_confirmed", "Events the broker confirmed", s.confirmed),
            ("cdc_relay_events_nacked", "Broker nacks", s.nacked),
            ("cdc_relay_events_returned", "Unroutable returns (mandatory)", s.returned),
            (
                "cdc_relay_events_dead_lettered",
                "Events sent to the dead-letter exchange",
                s.dead_lettered,
            ),
            (
                "cdc_relay_messages_ignored",
                "Logical messages that are not outbox events",
                s.ignored_messages,
            ),
            (
                "cdc_relay_events_invalid",
                "Rows that could not become a message (dead-lettered under "
                "invalid_event_policy = dead_letter)",
                s.invalid_events,
            ),
            (
                "cdc_relay_failed_sessions",
                "Sessions that ended in a failure without moving the slot (a retry loop)",
                s.failed_sessions,
            ),
            (
                "cdc_relay_ledger_rows",
                "Confirmed transactions written to the delivery ledger (ledger = true)",
                s.ledger_rows,
            ),
            (
                "cdc_relay_ledger_failures",
                "Failed writes of the delivery ledger (its rows are kept and retried)",
                s.ledger_failures,
            ),
            (
                "cdc_relay_ledger_dropped",
                "Ledger rows dropped because the ledger could not be written for too long",
                s.ledger_dropped,
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self._slot], value)
            yield c
        reconnects = CounterMetricFamily(
            "cdc_relay_reconnects", "Sessions ended by a failure, by side", labels=["slot", "side"]
        )
        for side, n in s.reconnects.items():
            reconnects.add_metric([self._slot, side], n)
        yield reconnects
        gauges: tuple[tuple[str, str, float], ...] = (
            ("cdc_relay_in_flight", "Published, not yet confirmed", s.in_flight),
            (
                "cdc_relay_in_flight_bytes",
                "Body bytes published, not yet confirmed",
                s.in_flight_bytes,
            ),
            (
                "cdc_relay_consecutive_failures",
                "Failed sessions in a row without progress (0 while healthy)",
                s.consecutive_failures,
            ),
            (
                "cdc_relay_replication_lag_bytes",
                "Server WAL end minus confirmed flush LSN",
                max(0, s.server_wal_end - s.confirmed_lsn) if s.confirmed_lsn else 0,
            ),
            (
                "cdc_relay_replication_lag_seconds",
                "Age of the oldest committed, unconfirmed txn",
                s.lag_seconds(now),
            ),
            (
                "cdc_relay_last_status_update_age_seconds",
                "Since the last standby status update",
                now - s.last_status_update if s.last_status_update else -1,
            ),
            (
                "cdc_relay_streaming",
                "1 while both sides are connected and streaming",
                int(s.streaming and s.broker_ready),
            ),
            (
                "cdc_relay_ledger_backlog",
                "Confirmed transactions waiting to be written to the delivery ledger",
                s.ledger_backlog,
            ),
            (
                "cdc_relay_propagation_alert",
                "1 while propagation is slower than the threshold",
                int(s.alert),
            ),
        )
        for gname, gdoc, gvalue in gauges:
            g = GaugeMetricFamily(gname, gdoc, labels=labels)
            g.add_metric([self._slot], gvalue)
            yield g
        slot_wal = s.slot_wal
        if slot_wal is not None:
            for wname, wdoc, wvalue in (
                (
                    "cdc_relay_slot_retained_wal_bytes",
                    "WAL the slot keeps on the server (current WAL minus restart_lsn)",
                    slot_wal[0],
                ),
                (
                    "cdc_relay_slot_safe_wal_bytes",
                    "WAL the slot may still retain before max_slot_wal_keep_size invalidates it "
                    "(-1: unlimited)",
                    slot_wal[1],
                ),
            ):
                w = GaugeMetricFamily(wname, wdoc, labels=labels)
                w.add_metric([self._slot], wvalue)
                yield w
        unroutable = GaugeMetricFamily(
            "cdc_relay_unroutable_events",
            "Events waiting in <exchange>.unroutable",
            labels=["slot", "queue"],
        )
        for queue, n in dict(s.unroutable).items():  # the loop thread may add keys meanwhile
            unroutable.add_metric([self._slot, queue], n)
        yield unroutable


class PropagationAlert:
    """Warn once per episode when events take longer than the threshold to reach the broker.

    An episode ends when both signals are back under half the threshold: the lag, and the
    latest transaction's commit→confirm; or when nothing has been pending for ``IDLE_RESET``
    seconds. Otherwise sparse traffic in which every transaction is late would warn once per
    transaction, each idle tick between them (lag 0) ending an "episode".
    """

    IDLE_RESET = 60.0

    def __init__(self, stats: Stats, threshold: float, slot: str) -> None:
        self._stats = stats
        self._threshold = threshold
        self._slot = slot
        self._last_commit_to_confirm = 0.0
        self._idle_since: float | None = None

    def check(self, commit_to_confirm: float | None = None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if commit_to_confirm is not None:
            self._last_commit_to_confirm = commit_to_confirm
        if self._stats.oldest_unconfirmed_commit is not None or commit_to_confirm is not None:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= self.IDLE_RESET:
            self._last_commit_to_confirm = 0.0  # a long quiet spell: the next late one is news
        half = self._threshold / 2
        slow = self._stats.lag_seconds() > self._threshold or (
            commit_to_confirm is not None and commit_to_confirm > self._threshold
        )
        if slow and not self._stats.alert:
            self._stats.alert = True
            log.warning(
                "propagation slower than threshold: events are late to the broker",
                extra={
                    "slot": self._slot,
                    "threshold_s": self._threshold,
                    "lag_s": round(self._stats.lag_seconds(), 3),
                    "commit_to_confirm_s": None
                    if commit_to_confirm is None
                    else round(commit_to_confirm, 3),
                },
            )
        elif (
            not slow
            and self._stats.alert
            and self._stats.lag_seconds() < half
            and self._last_commit_to_confirm < half
        ):
            self._stats.alert = False
            log.info("propagation back within threshold", extra={"slot": self._slot})


def _otlp_exporter() -> Any:
    """The OTLP span exporter the standard variables ask for; None if it is not installed."""
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            log.error(
                "OTLP gRPC exporter not installed (pip install "
                "opentelemetry-exporter-otlp-proto-grpc); tracing is off"
            )
            return None
        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Tracing is on when an OTLP endpoint is configured the standard OTEL_* way."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() in ("none", ""):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


class Tracing:
    """OpenTelemetry spans for published events; a do-nothing object when tracing is off."""

    def __init__(self, enabled: bool, exporter: Any = None) -> None:
        """``exporter``: a span exporter to use instead of the OTLP one the ``OTEL_*``
        variables describe (tests pass an in-memory one)."""
        self.enabled = enabled
        self._tracer: Any = None
        self._provider: Any = None
        self._propagator: Any = None
        self._trace: Any = None
        if enabled:
            self._setup(exporter)

    def _setup(self, exporter: Any) -> None:
        # imported here so that a relay with tracing off never loads the SDK
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            exporter = _otlp_exporter()
            if exporter is None:
                self.enabled = False
                return
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "cdc-relay")}
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer(TRACER_NAME)
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    def start_publish(
        self,
        exchange: str,
        routing_key: str,
        message_id: str,
        traceparent: str | None,
        lsn: str,
        txid: int,
        slot: str,
    ) -> tuple[Any, str]:
        """A PRODUCER span for one event; returns it and the traceparent to send on."""
        trace = self._trace
        ctx = None
        if traceparent:
            ctx = self._propagator.extract({"traceparent": traceparent})
        span = self._tracer.start_span(
            f"{SPAN_PUBLISH} {exchange}",
            context=ctx,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.operation.name": "publish",
                "messaging.destination.name": exchange,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": message_id,
                "db.system.name": "postgresql",
                "cdc_relay.source.lsn": lsn,
                "cdc_relay.source.txid": txid,
                "cdc_relay.slot": slot,
            },
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier.get("traceparent", traceparent or "")

    def start_process(self, queue: str, message_id: str, traceparent: str | None) -> Any:
        """A CONSUMER span ``process <queue>`` for one message, continuing the trace its
        ``traceparent`` header carries (the relay's publish span), so the writer, the relay and
        the consumer show as one trace. The caller ends it."""
        ctx = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        return self._tracer.start_span(
            f"process {queue}",
            context=ctx,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": queue,
                "messaging.message.id": message_id,
            },
        )

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


@dataclass
class Telemetry:
    """What one relay process reports, shared by its successive sessions."""

    stats: Stats
    metrics: Metrics
    tracing: Tracing
    alert: PropagationAlert

    @classmethod
    def create(cls, slot: str, alert_threshold: float, tracing: bool) -> Telemetry:
        stats = Stats()
        return cls(
            stats=stats,
            metrics=Metrics(stats, slot),
            tracing=Tracing(tracing),
            alert=PropagationAlert(stats, alert_threshold, slot),
        )


class SessionObserver:
    """Telemetry of one session, fed the effects its pipeline emits.

    It decides nothing: counters, the latency histograms, the propagation alert and (tracing on)
    one PRODUCER span per event that gets a confirm event when the broker acks it and ends when
    the checkpoint covering it is reported to PostgreSQL.
    """

    def __init__(self, telemetry: Telemetry, slot: str) -> None:
        self._slot = slot
        self._stats = telemetry.stats
        self._metrics = telemetry.metrics
        self._tracing = telemetry.tracing
        self._alert = telemetry.alert
        self.tracing = telemetry.tracing.enabled
        # (end_lsn, commit unix time) of committed transactions with events, not yet confirmed
        self._pending_commits: deque[tuple[int, float]] = deque()
        # (delivery tag, publish time) for every 16th message: confirm latency samples
        self._latency_samples: deque[tuple[int, float]] = deque()
        # spans started by trace(), by event id, until on_publish attaches them to their tag:
        # the driver performs a whole drain's effects after the drain, so several events can
        # be traced before the first of them is published
        self._new_spans: dict[str, deque[Any]] = {}
        self._open_spans: list[Any] = []
        self._span_txns: deque[tuple[int, list[Any]]] = deque()
        self._unconfirmed_spans: deque[tuple[int, Any]] = deque()

    def trace(
        self, event: OutboxEvent, exchange: str, routing_key: str, tx: TransactionInfo
    ) -> str | None:
        """Start the event's span; the traceparent it returns travels in the AMQP headers."""
        span, traceparent = self._tracing.start_publish(
            exchange,
            routing_key,
            event.id,
            event.traceparent,
            str(event.lsn),
            tx.xid,
            self._slot,
        )
        self._new_spans.setdefault(event.id, deque()).append(span)
        return traceparent

    def on_publish(self, effect: Publish, in_flight: int, in_flight_bytes: int) -> None:
        stats = self._stats
        stats.published += 1
        stats.in_flight = in_flight
        stats.in_flight_bytes = in_flight_bytes
        tag = effect.tag
        if effect.dead_letter:
            stats.dead_lettered += 1
            if effect.dead_letter == "invalid":
                stats.invalid_events += 1
        if not tag & 15:
            self._latency_samples.append((tag, time.monotonic()))
        waiting = self._new_spans.get(effect.message.message_id) if self._new_spans else None
        if waiting:
            span = waiting.popleft()
            if not waiting:
                del self._new_spans[effect.message.message_id]
            self._open_spans.append(span)
            self._unconfirmed_spans.append((tag, span))

    def on_committed(self, effect: Committed) -> None:
        self._pending_commits.append((effect.end_lsn, effect.committed_at))
        if self._stats.oldest_unconfirmed_commit is None:
            self._stats.oldest_unconfirmed_commit = self._pending_commits[0][1]
        if self._open_spans:
            self._span_txns.append((effect.end_lsn, self._open_spans))
            self._open_spans = []

    def on_acked(self, effect: Acked, in_flight: int, in_flight_bytes: int) -> None:
        stats = self._stats
        stats.confirmed += effect.count
        stats.in_flight = in_flight
        stats.in_flight_bytes = in_flight_bytes
        through = effect.acked_through
        samples = self._latency_samples
        if samples and samples[0][0] <= through:
            sent = 0.0
            while samples and samples[0][0] <= through:
                sent = samples.popleft()[1]
            self._metrics.confirm_latency.observe(time.monotonic() - sent)
        spans = self._unconfirmed_spans
        while spans and spans[0][0] <= through:
            spans.popleft()[1].add_event(EVENT_CONFIRM)
        pending = self._pending_commits
        confirmed = effect.confirmed
        if pending and pending[0][0] <= confirmed:
            now = time.time()
            histogram = self._metrics.commit_to_confirm
            latency = 0.0
            while pending and pending[0][0] <= confirmed:
                done = pending.popleft()
                latency = now - done[1]
                histogram.observe(latency)
            stats.confirmed_commit = (int(done[0]), done[1])
            stats.oldest_unconfirmed_commit = pending[0][1] if pending else None
            self._alert.check(latency)

    def on_progress(self) -> None:
        stats = self._stats
        stats.last_progress = time.time()
        stats.consecutive_failures = 0  # this session works: whatever failed before is over

    def on_status(self, effect: SendStatus) -> None:
        stats = self._stats
        stats.last_status_update = time.time()
        stats.confirmed_lsn = effect.flush
        txns = self._span_txns
        while txns and txns[0][0] <= effect.flush:
            for span in txns.popleft()[1]:
                span.add_event(EVENT_FLUSH, {"cdc_relay.flush_lsn": str(effect.flush)})
                span.end()

    def on_finish(self, effect: Finish) -> None:
        """Spans not covered by the final status end unflushed: they will be sent again."""
        if effect.final_flush is not None:
            self._stats.confirmed_lsn = effect.final_flush
            txns = self._span_txns
            while txns and txns[0][0] <= effect.final_flush:
                for span in txns.popleft()[1]:
                    span.end()
        for span in self._open_spans + [s for _, spans in self._span_txns for s in spans]:
            span.set_attribute("cdc_relay.flushed", False)
            span.end()
        for waiting in self._new_spans.values():  # traced, never published (refused rows)
            for span in waiting:
                span.set_attribute("cdc_relay.published", False)
                span.end()
        self._open_spans = []
        self._span_txns.clear()
        self._new_spans.clear()
        self._unconfirmed_spans.clear()
        stats = self._stats
        stats.streaming = False
        stats.broker_ready = False
        stats.broker = None
        stats.in_flight = 0
        stats.in_flight_bytes = 0
        self._pending_commits.clear()
        stats.oldest_unconfirmed_commit = None
