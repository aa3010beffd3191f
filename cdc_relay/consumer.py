"""``cdc-relay consume``: the inbox consumer on a RabbitMQ queue, as a thin adapter.

Manual acknowledgements with a prefetch window; each message is decoded into ``EnvelopeV1``
and handed to ``inbox.process`` (one transaction on the consumer's database), and acknowledged
only after that transaction committed. Two kinds of message never block the queue:

* a body that is not a v1 envelope is sent to ``dead_letter_exchange`` at once, with the reason
  in ``x-cdc-relay-error``, and acknowledged;
* a handler that raises is retried ``handler_retries`` times with backoff (0.2 s doubling),
  then sent to ``dead_letter_exchange`` the same way, counted and logged, and the consumer goes
  on with the next message.

The dead-letter publish is confirmed before the original is acknowledged, so a crash between
the two only repeats the dead letter. Without ``dead_letter_exchange`` such a message is
rejected without requeue (the queue's own dead-lettering, if any, takes it).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cdc_relay import audit, broker_url, failpoints, inbox
from cdc_relay.brokers import Brokers
from cdc_relay.config import Config, redact
from cdc_relay.errors import POSTGRES, RABBITMQ, ConfigError, ConnectionLost, RelayError
from cdc_relay.messages import EnvelopeV1
from cdc_relay.postgres import connect_failure
from cdc_relay.signals import StopSignal
from cdc_relay.telemetry import LATENCY_BUCKETS, Stats, Tracing

log = logging.getLogger("cdc_relay.consumer")

ERROR_HEADER = "x-cdc-relay-error"
_ERROR_MAX = 512


class ConsumerMetrics:
    """The consumer's /metrics: what happened to each message, and how old events are when
    applied (commit in the source database → commit in the consumer's)."""

    def __init__(self, queue: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "cdc_relay_consumer_events",
            "Messages taken, by outcome (applied, duplicate, skipped, parked, dead_lettered)",
            ["queue", "outcome"],
            registry=self.registry,
        )
        self.age = Histogram(
            "cdc_relay_consumer_age_seconds",
            "Source commit to applied in the consumer's database, per applied event",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.alert = Gauge(
            "cdc_relay_consumer_age_alert",
            "1 while events are applied later than alert_latency after their commit",
            ["queue"],
            registry=self.registry,
        )
        self.audit_drift = Gauge(
            "cdc_relay_consumer_audit_drift_windows",
            "Windows that differ between the source and the inbox in the last periodic audit "
            "(audit_interval)",
            ["queue"],
            registry=self.registry,
        )
        self.audit_missing = Gauge(
            "cdc_relay_consumer_audit_missing_events",
            "Source events minus applied events over the differing windows of the last "
            "periodic audit",
            ["queue"],
            registry=self.registry,
        )
        self.audits = Counter(
            "cdc_relay_consumer_audits",
            "Periodic audits, by result (agree, drift, error)",
            ["queue", "result"],
            registry=self.registry,
        )
        self.queue = queue
        for result in ("agree", "drift", "error"):
            self.audits.labels(queue, result)
        for outcome in ("applied", "duplicate", "skipped", "parked", "dead_lettered"):
            self.events.labels(queue, outcome)


class AgeAlert:
    """One warning per episode when events are applied later than ``threshold`` after their
    commit; the episode ends when one is applied within half of it."""

    def __init__(self, threshold: float, metrics: ConsumerMetrics) -> None:
        self.threshold = threshold
        self.metrics = metrics
        self.active = False

    def observe(self, age: float, event_id: str) -> None:
        if not self.active and age > self.threshold:
            self.active = True
            self.metrics.alert.labels(self.metrics.queue).set(1)
            log.warning(
                "consumer behind: event applied later than threshold after its commit",
                extra={"age_s": round(age, 3), "threshold_s": self.threshold, "event_id": event_id},
            )
        elif self.active and age < self.threshold / 2:
            self.active = False
            self.metrics.alert.labels(self.metrics.queue).set(0)
            log.info("consumer back within threshold", extra={"age_s": round(age, 3)})


class DriftAlert:
    """Exports each periodic audit and warns once per episode of drift."""

    def __init__(self, metrics: ConsumerMetrics) -> None:
        self.metrics = metrics
        self.active = False

    def report(self, report: audit.Report) -> None:
        m, q = self.metrics, self.metrics.queue
        drift = report.drift
        missing = sum(max(0, w.source_count - w.inbox_count) for w in drift)
        m.audit_drift.labels(q).set(len(drift))
        m.audit_missing.labels(q).set(missing)
        m.audits.labels(q, "drift" if drift else "agree").inc()
        if drift and not self.active:
            self.active = True
            log.warning(
                "audit: the inbox differs from the source (run `cdc-relay audit` for the ids)",
                extra={
                    "windows": len(drift),
                    "missing_events": missing,
                    "first_window": drift[0].start.isoformat(),
                    "source": report.source,
                },
            )
        elif not drift and self.active:
            self.active = False
            log.info("audit: the inbox agrees with the source again")

    def error(self, exc: Exception) -> None:
        self.metrics.audits.labels(self.metrics.queue, "error").inc()
        log.warning("periodic audit failed", extra={"error": redact(str(exc)).strip()[:200]})


@dataclass
class Counts:
    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    parked: int = 0
    dead_lettered: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


def load_handler(spec: str) -> inbox.Handler:
    """``package.module:function`` → the function."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError("handler", f"expected MODULE:FUNCTION, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("handler", f"cannot import {module_name}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError("handler", f"{module_name} has no function {name}")
    return fn  # type: ignore[no-any-return]


def open_inbox(cfg: Config) -> inbox.Conn:
    try:
        conn = psycopg.connect(cfg.inbox_dsn, application_name="cdc-relay-consumer")
    except psycopg.OperationalError as exc:
        raise connect_failure(redact(str(exc)).strip(), replication=False) from None
    try:
        inbox.setup(conn)
    except psycopg.Error as exc:
        conn.close()
        raise ConnectionLost(
            f"cannot create the inbox tables: {redact(str(exc)).strip()}", side=POSTGRES
        ) from None
    return conn


@dataclass(frozen=True, slots=True)
class Delivery:
    method: Any
    props: Any
    body: bytes

    @property
    def tag(self) -> int:
        return int(self.method.delivery_tag)


class Consumer:
    """One session: a RabbitMQ channel and an inbox connection, until stopped or broken.

    Deliveries are taken in batches of what has arrived (at most ``consumer_batch``, never
    waiting for more), applied in one inbox transaction, and acknowledged with one ``multiple``
    ack after the commit. Batches keep delivery order, so everything before an acknowledged tag
    is done: committed, or dead-lettered and acknowledged.
    """

    def __init__(
        self,
        cfg: Config,
        queue: str,
        handler: inbox.Handler,
        stop: StopSignal,
        stats: Stats | None = None,
        metrics: ConsumerMetrics | None = None,
        tracing: Tracing | None = None,
        brokers: Brokers | None = None,
    ) -> None:
        self.cfg = cfg
        self.brokers = brokers or Brokers(cfg.amqp_url, cfg.amqp_shuffle)
        self.queue = queue
        self.handler = handler
        self.stop = stop
        self.counts = Counts()
        self.stats = stats or Stats()
        self.metrics = metrics or ConsumerMetrics(queue)
        self.age_alert = AgeAlert(cfg.alert_latency, self.metrics)
        self.tracing = tracing or Tracing(False)
        self._spans: dict[int, Any] = {}
        self._positions: dict[int, inbox.Position] = {}  # by delivery tag, until acknowledged
        # the children every applied event updates, looked up once
        self._age = self.metrics.age.labels(queue)
        self._applied = self.metrics.events.labels(queue, inbox.Outcome.APPLIED.value)

    def run(self) -> None:
        self._db = db = open_inbox(self.cfg)
        brokers = self.brokers
        order = brokers.order()
        try:
            # pika tries the nodes in this order and keeps the first that answers
            connection = pika.BlockingConnection([brokers.candidates[i] for i in order])
        except pika.exceptions.AMQPError as exc:
            db.close()
            tried = f" (tried all {len(order)} nodes of amqp_url)" if len(order) > 1 else ""
            raise ConnectionLost(
                f"cannot connect to RabbitMQ: {redact(str(exc) or type(exc).__name__)}{tried}",
                side=RABBITMQ,
            ) from None
        used = broker_url.describe(connection._impl.params)  # pika names the node only there
        names = brokers.names
        brokers.connected(next((i for i in order if names[i] == used), order[0]))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.cfg.consumer_prefetch)
            arrived: list[Delivery] = []
            tag = channel.basic_consume(
                self.queue, lambda _ch, m, p, b: arrived.append(Delivery(m, p, b))
            )
            log.info("consuming", extra={"queue": self.queue, "broker": brokers.in_use})
            stats = self.stats
            stats.streaming = stats.broker_ready = True
            stats.broker = brokers.in_use
            stats.consecutive_failures = 0
            while not self.stop.requested:
                # wait only when nothing is in hand; otherwise just gather what else arrived
                connection.process_data_events(time_limit=0 if arrived else 0.5)
                stats.last_loop_tick = time.time()
                if not arrived:
                    stats.last_progress = stats.last_loop_tick  # idle and connected: fine
                    continue
                batch = arrived[: self.cfg.consumer_batch]
                del arrived[: len(batch)]
                self._batch(channel, batch)
                stats.last_progress = time.time()
            channel.basic_cancel(tag)
        except pika.exceptions.AMQPError as exc:
            node = brokers.in_use
            brokers.lost()  # the next session starts at the following node
            raise ConnectionLost(
                f"RabbitMQ connection lost: {redact(str(exc) or type(exc).__name__)}",
                side=RABBITMQ,
                broker=node,
            ) from None
        finally:
            self.stats.streaming = self.stats.broker_ready = False
            self.stats.broker = None
            for span in self._spans.values():
                span.end()
            self._spans.clear()
            if connection.is_open:
                connection.close()
            db.close()

    def _batch(self, channel: Any, batch: list[Delivery]) -> None:
        if self.tracing.enabled:
            for d in batch:
                traceparent = (d.props.headers or {}).get("traceparent")
                if isinstance(traceparent, bytes):
                    traceparent = traceparent.decode(errors="replace")
                self._spans[d.tag] = self.tracing.start_process(
                    self.queue,
                    str(d.props.message_id),
                    traceparent if isinstance(traceparent, str) else None,
                )
        run: list[tuple[Delivery, EnvelopeV1]] = []
        for d in batch:
            try:
                event = inbox.decode(d.body)
                self._positions[d.tag] = inbox.position(event)  # read once, used by the guard
            except inbox.NotAnEnvelope as exc:
                self._apply(channel, run)
                run = []
                self._dead_letter(channel, d, f"not a v1 envelope: {exc}")
                continue
            run.append((d, event))
        self._apply(channel, run)

    def _apply(self, channel: Any, run: list[tuple[Delivery, EnvelopeV1]]) -> None:
        """Apply ``run`` in one transaction; a handler failure splits it around the failed
        event, which is retried alone (so its aggregate's order holds) or dead-lettered."""
        while run:
            try:
                outcomes = self._transaction(run)
            except inbox.HandlerFailed as failed:
                before, (d, event) = run[: failed.index], run[failed.index]
                run = run[failed.index + 1 :]
                self._apply(channel, before)
                self._retry(channel, d, event, failed.cause)
                continue
            self._done(channel, run, outcomes)
            return

    def _retry(self, channel: Any, d: Delivery, event: EnvelopeV1, cause: BaseException) -> None:
        delay = 0.2
        for _ in range(self.cfg.handler_retries):
            time.sleep(delay)
            delay *= 2
            try:
                outcomes = self._transaction([(d, event)])
            except inbox.HandlerFailed as failed:
                cause = failed.cause
                continue
            self._done(channel, [(d, event)], outcomes)
            return
        log.error(
            "handler failed; message dead-lettered",
            extra={
                "event_id": event.id,
                "attempts": self.cfg.handler_retries + 1,
                # the type and the start of the message: the handler's text may quote the
                # payload, which logs must not carry whole
                "error": f"{type(cause).__name__}: {str(cause)[:120]}",
            },
        )
        self._dead_letter(channel, d, f"handler: {cause!r}")

    def _transaction(self, run: list[tuple[Delivery, EnvelopeV1]]) -> list[inbox.Outcome]:
        db = self._db
        events = [e for _, e in run]
        positions = [self._positions[d.tag] for d, _ in run]
        try:
            return inbox.apply(db, events, self.handler, self.cfg.ordering_policy, positions)
        except inbox.HandlerFailed:
            if db.closed or db.broken:
                raise ConnectionLost("the inbox database connection broke", side=POSTGRES) from None
            raise
        except psycopg.OperationalError as exc:
            # the database went away: the session ends, the messages are redelivered
            raise ConnectionLost(
                f"the inbox database failed: {redact(str(exc)).strip()}", side=POSTGRES
            ) from None
        except psycopg.Error as exc:
            raise RelayError(
                f"the inbox's own statement failed: {redact(str(exc)).strip()}", side=POSTGRES
            ) from None

    def _done(
        self, channel: Any, run: list[tuple[Delivery, EnvelopeV1]], outcomes: list[inbox.Outcome]
    ) -> None:
        if not run:
            return
        failpoints.crash("consumer.after_commit")  # fault tests: committed, not acked
        channel.basic_ack(run[-1][0].tag, multiple=True)
        positions = self._positions
        for d, _ in run:
            del positions[d.tag]
        now = time.time()
        age_of = self._age.observe
        applied = inbox.Outcome.APPLIED
        spans = self._spans
        for (d, event), outcome in zip(run, outcomes, strict=True):
            if outcome is applied:
                age = now - event.committed_at.timestamp()
                age_of(age if age > 0.0 else 0.0)
                self.age_alert.observe(age, event.id)
            else:
                self._count(outcome)
            if spans:
                self._end_span(d)
        done = sum(1 for o in outcomes if o is applied)
        if done:
            self._applied.inc(done)
            self.counts.applied += done
            by = self.counts.by_outcome
            by[applied.value] = by.get(applied.value, 0) + done

    def _end_span(self, d: Delivery) -> None:
        span = self._spans.pop(d.tag, None)
        if span is not None:
            span.end()

    def _count(self, outcome: inbox.Outcome) -> None:
        """Everything but an applied event (those are counted per batch in ``_done``)."""
        self.metrics.events.labels(self.queue, outcome.value).inc()
        c = self.counts
        c.by_outcome[outcome.value] = c.by_outcome.get(outcome.value, 0) + 1
        if outcome is inbox.Outcome.DUPLICATE:
            c.duplicates += 1
        elif outcome is inbox.Outcome.SKIPPED:
            c.skipped += 1
            log.warning("event older than its aggregate's last applied one: skipped")
        else:
            c.parked += 1

    def _dead_letter(self, channel: Any, d: Delivery, why: str) -> None:
        self._positions.pop(d.tag, None)
        self.counts.dead_lettered += 1
        self.metrics.events.labels(self.queue, "dead_lettered").inc()
        exchange = self.cfg.dead_letter_exchange
        if not exchange:
            channel.basic_reject(d.tag, requeue=False)
            self._end_span(d)
            return
        props = d.props
        headers = dict(props.headers or {})
        headers[ERROR_HEADER] = why[:_ERROR_MAX]
        headers["x-original-queue"] = self.queue
        out = pika.BasicProperties(
            content_type=props.content_type,
            delivery_mode=2,
            message_id=props.message_id,
            type=props.type,
            timestamp=props.timestamp,
            headers=headers,
        )
        try:
            channel.basic_publish(exchange, d.method.routing_key, d.body, out, mandatory=False)
        except pika.exceptions.AMQPError as exc:
            raise RelayError(f"could not dead-letter a message: {exc}", side=RABBITMQ) from None
        channel.basic_ack(d.tag)
        self._end_span(d)
