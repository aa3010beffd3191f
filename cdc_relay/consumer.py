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

from cdc_relay import broker_url, failpoints, inbox
from cdc_relay.config import Config, redact
from cdc_relay.errors import POSTGRES, RABBITMQ, ConfigError, ConnectionLost, RelayError
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
        self.queue = queue
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


class Consumer:
    def __init__(
        self,
        cfg: Config,
        queue: str,
        handler: inbox.Handler,
        stop: StopSignal,
        stats: Stats | None = None,
        metrics: ConsumerMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.handler = handler
        self.stop = stop
        self.counts = Counts()
        self.stats = stats or Stats()
        self.metrics = metrics or ConsumerMetrics(queue)
        self.age_alert = AgeAlert(cfg.alert_latency, self.metrics)
        self.tracing = tracing or Tracing(False)

    def run(self) -> None:
        db = open_inbox(self.cfg)
        params = broker_url.parameters(self.cfg.amqp_url)
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError as exc:
            db.close()
            raise ConnectionLost(
                f"cannot connect to RabbitMQ: {redact(str(exc) or type(exc).__name__)}",
                side=RABBITMQ,
            ) from None
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.cfg.consumer_prefetch)
            log.info(
                "consuming",
                extra={"queue": self.queue, "broker": broker_url.describe(params)},
            )
            stats = self.stats
            stats.streaming = stats.broker_ready = True
            stats.consecutive_failures = 0
            for method, props, body in channel.consume(self.queue, inactivity_timeout=0.5):
                stats.last_loop_tick = time.time()
                if self.stop.requested:
                    break
                if method is None:
                    stats.last_progress = stats.last_loop_tick  # idle and connected: fine
                    continue
                self._one(db, channel, method, props, body)
                stats.last_progress = time.time()
            channel.cancel()
        except pika.exceptions.AMQPError as exc:
            raise ConnectionLost(
                f"RabbitMQ connection lost: {redact(str(exc) or type(exc).__name__)}",
                side=RABBITMQ,
            ) from None
        finally:
            self.stats.streaming = self.stats.broker_ready = False
            if connection.is_open:
                connection.close()
            db.close()

    def _one(self, db: inbox.Conn, channel: Any, method: Any, props: Any, body: bytes) -> None:
        if not self.tracing.enabled:
            self._handle(db, channel, method, props, body)
            return
        traceparent = (props.headers or {}).get("traceparent")
        if isinstance(traceparent, bytes):
            traceparent = traceparent.decode(errors="replace")
        span = self.tracing.start_process(
            self.queue, str(props.message_id), traceparent if isinstance(traceparent, str) else None
        )
        try:
            self._handle(db, channel, method, props, body)
        finally:
            span.end()

    def _handle(self, db: inbox.Conn, channel: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            event = inbox.decode(body)
            inbox.position(event)
        except inbox.NotAnEnvelope as exc:
            self._dead_letter(channel, method, props, body, f"not a v1 envelope: {exc}")
            return
        delay = 0.2
        for attempt in range(self.cfg.handler_retries + 1):
            try:
                outcome = inbox.process(db, event, self.handler, self.cfg.ordering_policy)
            except psycopg.OperationalError as exc:
                # the database went away: the session ends, the message is redelivered
                raise ConnectionLost(
                    f"the inbox database failed: {redact(str(exc)).strip()}", side=POSTGRES
                ) from None
            except Exception as exc:  # noqa: BLE001 - the handler is the user's code
                if db.closed or db.broken:
                    raise ConnectionLost(
                        "the inbox database connection broke", side=POSTGRES
                    ) from None
                if attempt == self.cfg.handler_retries:
                    log.error(
                        "handler failed; message dead-lettered",
                        extra={
                            "event_id": event.id,
                            "attempts": attempt + 1,
                            # the type and the start of the message: the handler's text may
                            # quote the payload, which logs must not carry whole
                            "error": f"{type(exc).__name__}: {str(exc)[:120]}",
                        },
                    )
                    self._dead_letter(channel, method, props, body, f"handler: {exc!r}")
                    return
                time.sleep(delay)
                delay *= 2
                continue
            self._count(outcome)
            if outcome is inbox.Outcome.APPLIED:
                age = max(0.0, time.time() - event.committed_at.timestamp())
                self.metrics.age.labels(self.queue).observe(age)
                self.age_alert.observe(age, event.id)
            failpoints.crash("consumer.after_commit")  # fault tests: committed, not acked
            channel.basic_ack(method.delivery_tag)
            return

    def _count(self, outcome: inbox.Outcome) -> None:
        self.metrics.events.labels(self.queue, outcome.value).inc()
        c = self.counts
        c.by_outcome[outcome.value] = c.by_outcome.get(outcome.value, 0) + 1
        if outcome is inbox.Outcome.APPLIED:
            c.applied += 1
        elif outcome is inbox.Outcome.DUPLICATE:
            c.duplicates += 1
        elif outcome is inbox.Outcome.SKIPPED:
            c.skipped += 1
            log.warning("event older than its aggregate's last applied one: skipped")
        else:
            c.parked += 1

    def _dead_letter(self, channel: Any, method: Any, props: Any, body: bytes, why: str) -> None:
        self.counts.dead_lettered += 1
        self.metrics.events.labels(self.queue, "dead_lettered").inc()
        exchange = self.cfg.dead_letter_exchange
        if not exchange:
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
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
            channel.basic_publish(exchange, method.routing_key, body, out, mandatory=False)
        except pika.exceptions.AMQPError as exc:
            raise RelayError(f"could not dead-letter a message: {exc}", side=RABBITMQ) from None
        channel.basic_ack(method.delivery_tag)
