"""Telemetry: when tracing turns on, the lag and alert rules, what /metrics exposes, and spans."""

from __future__ import annotations

import logging
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cdc_relay import telemetry
from cdc_relay.config import load
from cdc_relay.errors import ConnectionLost
from cdc_relay.lsn import Lsn
from cdc_relay.messages import MessageBuilder
from cdc_relay.outbox import OutboxMapper
from cdc_relay.pgoutput import Begin, Column, Commit, Insert, Relation
from cdc_relay.pipeline import Acked, Committed, Effect, Finish, Pipeline, Publish, SendStatus
from cdc_relay.telemetry import (
    Metrics,
    PropagationAlert,
    SessionObserver,
    Stats,
    Telemetry,
    Tracing,
    tracing_requested,
)
from tests.unit.pgoutput_encoder import encode as pg_encode

SLOT = "orders_slot"
THRESHOLD = 5.0
ENDPOINT = "http://collector:4318"
PARENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
PARENT = f"00-{PARENT_TRACE_ID}-{PARENT_SPAN_ID}-01"
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
# A new root trace may also carry the W3C level 2 "random trace id" flag (0x02): 01 or 03.
ROOT_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]$")


# -- tracing_requested --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, False, id="empty"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True, id="endpoint"),
        pytest.param({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT}, True, id="traces-endpoint"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False, id="empty-endpoint"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"},
            False,
            id="sdk-disabled",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"},
            False,
            id="sdk-disabled-upper",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "True"},
            False,
            id="sdk-disabled-mixed",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "false"},
            True,
            id="sdk-disabled-false",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
            False,
            id="exporter-none",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "otlp"},
            True,
            id="exporter-otlp",
        ),
    ],
)
def test_tracing_requested(env: dict[str, str], expected: bool) -> None:
    """Only a configured OTLP endpoint turns tracing on; the standard off switches win."""
    assert tracing_requested(env) is expected


def test_tracing_requested_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping the real environment decides."""
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not tracing_requested()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", ENDPOINT)
    assert tracing_requested()


# -- Stats.lag_seconds --------------------------------------------------------------------------


def test_lag_is_zero_with_nothing_pending() -> None:
    assert Stats().lag_seconds(now=1_000_000.0) == 0.0


def test_lag_is_the_age_of_the_oldest_unconfirmed_commit() -> None:
    stats = Stats(oldest_unconfirmed_commit=1_000_000.0)
    assert stats.lag_seconds(now=1_000_007.5) == pytest.approx(7.5)


def test_lag_is_never_negative() -> None:
    """A commit timestamp ahead of our clock (skew between hosts) must not read as negative."""
    stats = Stats(oldest_unconfirmed_commit=1_000_010.0)
    assert stats.lag_seconds(now=1_000_000.0) == 0.0


def test_lag_defaults_to_the_current_time() -> None:
    stats = Stats(oldest_unconfirmed_commit=time.time() - 30)
    assert 29.0 < stats.lag_seconds() < 60.0


# -- PropagationAlert ---------------------------------------------------------------------------


@pytest.fixture
def alert_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="cdc_relay")
    return caplog


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "cdc_relay" and r.levelno == logging.WARNING]


def recoveries_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "cdc_relay" and r.getMessage() == "propagation back within threshold"
    ]


def set_lag(stats: Stats, seconds: float) -> None:
    stats.oldest_unconfirmed_commit = time.time() - seconds


def test_no_alert_while_fast(alert_logs: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    set_lag(stats, 1.0)
    alert.check(commit_to_confirm=THRESHOLD - 0.5)
    assert not stats.alert
    assert warnings_in(alert_logs) == []


def test_lag_alert_warns_once_per_episode(alert_logs: pytest.LogCaptureFixture) -> None:
    """An operator gets one warning when things turn slow, not one per tick."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    set_lag(stats, 10.0)
    alert.check()
    alert.check()
    assert stats.alert
    records = warnings_in(alert_logs)
    assert len(records) == 1
    record = records[0]
    assert "propagation slower than threshold" in record.getMessage()
    assert getattr(record, "slot", None) == SLOT
    assert getattr(record, "threshold_s", None) == THRESHOLD
    assert getattr(record, "lag_s", 0.0) >= 10.0
    assert getattr(record, "commit_to_confirm_s", "missing") is None


def test_commit_to_confirm_alert_warns_once_per_episode(
    alert_logs: pytest.LogCaptureFixture,
) -> None:
    """A slow transaction trips the alert even when nothing is pending any more."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    alert.check(commit_to_confirm=8.0)
    alert.check(commit_to_confirm=9.0)
    assert stats.alert
    records = warnings_in(alert_logs)
    assert len(records) == 1
    assert getattr(records[0], "commit_to_confirm_s", None) == 8.0
    assert getattr(records[0], "lag_s", None) == 0.0


def test_lag_alert_has_hysteresis(alert_logs: pytest.LogCaptureFixture) -> None:
    """Between half and the full threshold the alert holds; it clears only below half."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    set_lag(stats, 10.0)
    alert.check()
    assert stats.alert

    set_lag(stats, THRESHOLD * 0.6)  # under the threshold, above half of it
    alert.check()
    assert stats.alert
    assert recoveries_in(alert_logs) == []

    set_lag(stats, THRESHOLD * 0.2)  # under half
    alert.check()
    assert not stats.alert
    assert len(recoveries_in(alert_logs)) == 1
    assert len(warnings_in(alert_logs)) == 1


def test_cleared_when_nothing_is_pending(alert_logs: pytest.LogCaptureFixture) -> None:
    """Once everything is confirmed (lag 0) a quick transaction ends the episode."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    alert.check(commit_to_confirm=8.0)
    assert stats.alert
    alert.check(commit_to_confirm=0.1)
    assert not stats.alert
    assert len(recoveries_in(alert_logs)) == 1


def test_slow_commit_keeps_the_alert_even_with_no_lag(
    alert_logs: pytest.LogCaptureFixture,
) -> None:
    """A check reporting a slow transaction never clears the alert."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    set_lag(stats, 10.0)
    alert.check()
    stats.oldest_unconfirmed_commit = None
    alert.check(commit_to_confirm=7.0)
    assert stats.alert
    assert recoveries_in(alert_logs) == []


@pytest.mark.parametrize("trigger", ["lag", "commit_to_confirm"])
def test_a_new_episode_warns_again(alert_logs: pytest.LogCaptureFixture, trigger: str) -> None:
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)

    def slow() -> None:
        if trigger == "lag":
            set_lag(stats, 10.0)
            alert.check()
        else:
            stats.oldest_unconfirmed_commit = None
            alert.check(commit_to_confirm=10.0)

    slow()
    slow()
    assert len(warnings_in(alert_logs)) == 1

    stats.oldest_unconfirmed_commit = None
    alert.check(commit_to_confirm=0.1)  # a fast transaction, nothing pending
    assert not stats.alert

    slow()
    assert stats.alert
    assert len(warnings_in(alert_logs)) == 2
    assert len(recoveries_in(alert_logs)) == 1


def test_sparse_late_transactions_are_one_episode(alert_logs: pytest.LogCaptureFixture) -> None:
    """Idle ticks (nothing pending) between late transactions do not end the episode: only a
    transaction confirmed within half the threshold does."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    for _ in range(3):
        alert.check(commit_to_confirm=THRESHOLD + 1)
        for _tick in range(5):
            alert.check()
        assert stats.alert
    assert len(warnings_in(alert_logs)) == 1
    assert recoveries_in(alert_logs) == []
    alert.check(commit_to_confirm=THRESHOLD * 0.6)  # faster, but not within half
    assert stats.alert
    alert.check(commit_to_confirm=THRESHOLD * 0.2)
    assert not stats.alert
    assert len(recoveries_in(alert_logs)) == 1


# -- Metrics ------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    """What a Prometheus server would read from /metrics, keyed by sample name and labels."""
    text = generate_latest(metrics.registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"slot": SLOT, **labels}.items()))]


def bucket(samples: Samples, name: str, le: str) -> float:
    return samples[(f"{name}_bucket", frozenset({("le", le)}))]


def test_counters_expose_the_stats_with_the_slot_label() -> None:
    stats = Stats(
        published=11, confirmed=9, nacked=2, returned=3, dead_lettered=4, ignored_messages=5
    )
    samples = scrape(Metrics(stats, SLOT))
    assert value(samples, "cdc_relay_events_published_total") == 11
    assert value(samples, "cdc_relay_events_confirmed_total") == 9
    assert value(samples, "cdc_relay_events_nacked_total") == 2
    assert value(samples, "cdc_relay_events_returned_total") == 3
    assert value(samples, "cdc_relay_events_dead_lettered_total") == 4
    assert value(samples, "cdc_relay_messages_ignored_total") == 5


def test_every_stats_sample_carries_the_slot_label() -> None:
    """Several relays can share one Prometheus; the slot tells their series apart."""
    stats = Stats(unroutable={"orders.unroutable": 1})
    samples = scrape(Metrics(stats, SLOT))
    stat_samples = [
        labels
        for name, labels in samples
        if name.startswith("cdc_relay_")
        and "le" not in dict(labels)
        and not name.startswith(("cdc_relay_confirm_latency", "cdc_relay_commit_to_confirm"))
    ]
    assert len(stat_samples) >= 14
    assert all(("slot", SLOT) in labels for labels in stat_samples)


def test_scrape_reads_current_values() -> None:
    """Metrics are computed from Stats at scrape time, not copied at construction."""
    stats = Stats()
    metrics = Metrics(stats, SLOT)
    assert value(scrape(metrics), "cdc_relay_events_published_total") == 0
    stats.published = 42
    stats.in_flight = 7
    samples = scrape(metrics)
    assert value(samples, "cdc_relay_events_published_total") == 42
    assert value(samples, "cdc_relay_in_flight") == 7


@pytest.mark.parametrize(
    ("wal_end", "confirmed", "expected"),
    [
        pytest.param(0x16B3748, 0x16B3000, 0x748, id="behind"),
        pytest.param(0x16B3748, 0x16B3748, 0, id="caught-up"),
        pytest.param(0x16B3000, 0x16B3748, 0, id="wal-end-stale"),
        pytest.param(0x16B3748, 0, 0, id="nothing-confirmed-yet"),
    ],
)
def test_replication_lag_bytes(wal_end: int, confirmed: int, expected: int) -> None:
    """WAL end minus confirmed flush; 0 before the first confirm instead of the whole WAL."""
    stats = Stats(server_wal_end=wal_end, confirmed_lsn=confirmed)
    assert value(scrape(Metrics(stats, SLOT)), "cdc_relay_replication_lag_bytes") == expected


def test_replication_lag_seconds_and_alert_gauges() -> None:
    stats = Stats(alert=True)
    set_lag(stats, 20.0)
    samples = scrape(Metrics(stats, SLOT))
    assert 19.0 < value(samples, "cdc_relay_replication_lag_seconds") < 60.0
    assert value(samples, "cdc_relay_propagation_alert") == 1


def test_last_status_update_age() -> None:
    """-1 means no status update was ever sent; otherwise the seconds since the last one."""
    stats = Stats()
    metrics = Metrics(stats, SLOT)
    assert value(scrape(metrics), "cdc_relay_last_status_update_age_seconds") == -1
    stats.last_status_update = time.time() - 3
    assert 2.0 < value(scrape(metrics), "cdc_relay_last_status_update_age_seconds") < 60.0


@pytest.mark.parametrize(
    ("streaming", "broker_ready", "expected"),
    [(False, False, 0), (True, False, 0), (False, True, 0), (True, True, 1)],
)
def test_streaming_gauge_needs_both_sides(
    streaming: bool, broker_ready: bool, expected: int
) -> None:
    stats = Stats(streaming=streaming, broker_ready=broker_ready)
    assert value(scrape(Metrics(stats, SLOT)), "cdc_relay_streaming") == expected


def test_unroutable_gauge_per_queue() -> None:
    stats = Stats(unroutable={"orders.unroutable": 3, "payments.unroutable": 0})
    samples = scrape(Metrics(stats, SLOT))
    assert value(samples, "cdc_relay_unroutable_events", queue="orders.unroutable") == 3
    assert value(samples, "cdc_relay_unroutable_events", queue="payments.unroutable") == 0
    assert not any(
        name == "cdc_relay_unroutable_events" and ("queue", "other.unroutable") in labels
        for name, labels in samples
    )


def test_reconnects_by_side() -> None:
    stats = Stats()
    stats.reconnects["postgres"] += 2
    stats.reconnects["rabbitmq"] += 5
    samples = scrape(Metrics(stats, SLOT))
    assert value(samples, "cdc_relay_reconnects_total", side="postgres") == 2
    assert value(samples, "cdc_relay_reconnects_total", side="rabbitmq") == 5


def test_histograms_observe() -> None:
    metrics = Metrics(Stats(), SLOT)
    metrics.confirm_latency.observe(0.02)
    metrics.confirm_latency.observe(0.2)
    metrics.commit_to_confirm.observe(3.0)
    samples = scrape(metrics)

    name = "cdc_relay_confirm_latency_seconds"
    assert samples[(f"{name}_count", frozenset())] == 2
    assert samples[(f"{name}_sum", frozenset())] == pytest.approx(0.22)
    assert bucket(samples, name, "0.01") == 0
    assert bucket(samples, name, "0.025") == 1
    assert bucket(samples, name, "0.25") == 2
    assert bucket(samples, name, "+Inf") == 2

    name = "cdc_relay_commit_to_confirm_seconds"
    assert samples[(f"{name}_count", frozenset())] == 1
    assert bucket(samples, name, "2.5") == 0
    assert bucket(samples, name, "5.0") == 1


def test_each_metrics_has_its_own_registry() -> None:
    """Two Metrics (e.g. two tests, or a restart in-process) must not collide on names."""
    a = Metrics(Stats(published=1), SLOT)
    b = Metrics(Stats(published=2), SLOT)
    assert value(scrape(a), "cdc_relay_events_published_total") == 1
    assert value(scrape(b), "cdc_relay_events_published_total") == 2


# -- Tracing off --------------------------------------------------------------------------------


def test_tracing_off_is_disabled() -> None:
    tracing = Tracing(False)
    assert tracing.enabled is False
    tracing.shutdown()  # a no-op, not an error
    assert tracing.enabled is False


def test_tracing_off_does_not_import_the_sdk() -> None:
    """Tracing off costs nothing: the OpenTelemetry SDK is never loaded (fresh interpreter)."""
    code = (
        "import sys; from cdc_relay.telemetry import Tracing; Tracing(False); "
        "print('opentelemetry.sdk.trace' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


def test_missing_grpc_exporter_turns_tracing_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Asking for gRPC without its package logs an error and runs untraced, not crashes."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    # a None entry makes the import fail whether or not the package is installed
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    caplog.set_level(logging.ERROR, logger="cdc_relay")
    tracing = Tracing(True)
    assert tracing.enabled is False
    assert any("gRPC exporter not installed" in r.getMessage() for r in caplog.records)


def test_default_exporter_is_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """http/protobuf is the OTel default protocol; building the exporter sends nothing."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    exporter = telemetry._otlp_exporter()
    assert isinstance(exporter, OTLPSpanExporter)


def test_telemetry_create_wires_one_stats() -> None:
    """Metrics and the alert must read the very Stats the loop updates."""
    t = Telemetry.create(SLOT, alert_threshold=THRESHOLD, tracing=False)
    assert t.metrics.stats is t.stats
    assert t.tracing.enabled is False
    t.stats.published = 3
    assert value(scrape(t.metrics), "cdc_relay_events_published_total") == 3
    t.stats.oldest_unconfirmed_commit = time.time() - 2 * THRESHOLD
    t.alert.check()
    assert t.stats.alert


# -- Tracing on ---------------------------------------------------------------------------------


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    yield InMemorySpanExporter()


def finished(tracing: Tracing, exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    """Flush the batch processor and return what it exported."""
    tracing.shutdown()
    return exporter.get_finished_spans()


def test_publish_span_continues_the_outbox_trace(exporter: InMemorySpanExporter) -> None:
    tracing = Tracing(True, exporter=exporter)
    assert tracing.enabled
    span, traceparent = tracing.start_publish(
        "orders", "order.OrderPlaced", "id-1", PARENT, "0/16B3748", 731, "slot1"
    )

    match = TRACEPARENT_RE.match(traceparent)
    assert match is not None, traceparent
    trace_id, span_id = match.groups()
    assert trace_id == PARENT_TRACE_ID  # same trace as the writing transaction
    assert span_id != PARENT_SPAN_ID  # but our own span, so consumers become its children

    span.end()
    spans = finished(tracing, exporter)
    assert len(spans) == 1
    (exported,) = spans
    assert exported.name == "publish orders"
    assert exported.kind == SpanKind.PRODUCER
    assert exported.context is not None
    assert exported.context.trace_id == int(PARENT_TRACE_ID, 16)
    assert exported.context.span_id == int(span_id, 16)
    assert exported.parent is not None
    assert exported.parent.span_id == int(PARENT_SPAN_ID, 16)
    assert exported.parent.is_remote

    attributes = dict(exported.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.destination.name"] == "orders"
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "order.OrderPlaced"
    assert attributes["messaging.message.id"] == "id-1"
    assert attributes["cdc_relay.source.lsn"] == "0/16B3748"
    assert attributes["cdc_relay.source.txid"] == 731
    assert attributes["cdc_relay.slot"] == "slot1"
    assert exported.resource.attributes["service.name"] == "cdc-relay"


@pytest.mark.parametrize("parent", [None, ""])
def test_publish_span_without_a_parent_starts_a_trace(
    exporter: InMemorySpanExporter, parent: str | None
) -> None:
    """Rows written without tracing still get a trace of their own from the relay on."""
    tracing = Tracing(True, exporter=exporter)
    span, traceparent = tracing.start_publish(
        "orders", "order.OrderPlaced", "id-2", parent, "0/16B3748", 732, "slot1"
    )
    match = ROOT_TRACEPARENT_RE.match(traceparent)
    assert match is not None, traceparent
    trace_id, _ = match.groups()
    assert int(trace_id, 16) != 0

    span.end()
    (exported,) = finished(tracing, exporter)
    assert exported.parent is None
    assert exported.context is not None
    assert exported.context.trace_id == int(trace_id, 16)


def test_each_event_gets_its_own_span(exporter: InMemorySpanExporter) -> None:
    """Two events of one transaction share the trace but not the span id they send on."""
    tracing = Tracing(True, exporter=exporter)
    first, tp1 = tracing.start_publish("orders", "k", "id-1", PARENT, "0/1", 1, "slot1")
    second, tp2 = tracing.start_publish("orders", "k", "id-2", PARENT, "0/1", 1, "slot1")
    m1, m2 = TRACEPARENT_RE.match(tp1), TRACEPARENT_RE.match(tp2)
    assert m1 is not None
    assert m2 is not None
    assert m1.group(1) == m2.group(1) == PARENT_TRACE_ID
    assert m1.group(2) != m2.group(2)
    first.end()
    second.end()
    assert len(finished(tracing, exporter)) == 2


def test_unended_span_is_not_exported(exporter: InMemorySpanExporter) -> None:
    """The span ends when the checkpoint covering it is reported, not when it is started."""
    tracing = Tracing(True, exporter=exporter)
    tracing.start_publish("orders", "k", "id-1", PARENT, "0/1", 1, "slot1")
    assert finished(tracing, exporter) == ()


def test_service_name_from_environment(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-under-test")
    tracing = Tracing(True, exporter=exporter)
    span, _ = tracing.start_publish("orders", "k", "id-1", PARENT, "0/1", 1, "slot1")
    span.end()
    (exported,) = finished(tracing, exporter)
    assert exported.resource.attributes["service.name"] == "relay-under-test"


def test_malformed_parent_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    """A junk traceparent in an outbox row must not break publishing; it is ignored."""
    tracing = Tracing(True, exporter=exporter)
    span, traceparent = tracing.start_publish("orders", "k", "id-1", "garbage", "0/1", 1, "slot1")
    match = ROOT_TRACEPARENT_RE.match(traceparent)
    assert match is not None, traceparent
    span.end()
    (exported,) = finished(tracing, exporter)
    assert exported.parent is None


def test_a_long_quiet_spell_ends_the_episode(alert_logs: pytest.LogCaptureFixture) -> None:
    """After a late transaction the alert holds while idle, but not forever: nothing pending
    for IDLE_RESET seconds clears it, so a late transaction next morning warns again."""
    stats = Stats()
    alert = PropagationAlert(stats, THRESHOLD, SLOT)
    alert.check(commit_to_confirm=THRESHOLD + 1, now=0.0)
    for t in range(1, int(PropagationAlert.IDLE_RESET)):
        alert.check(now=float(t))
        assert stats.alert, t
    alert.check(now=PropagationAlert.IDLE_RESET + 1)
    assert not stats.alert
    assert len(recoveries_in(alert_logs)) == 1
    alert.check(commit_to_confirm=THRESHOLD + 1, now=PropagationAlert.IDLE_RESET + 2)
    assert len(warnings_in(alert_logs)) == 2


# -- SessionObserver: a pipeline's effects → counters, histograms, spans --------------------------
def _observed_pipeline(
    tracing: Tracing | None = None,
) -> tuple[Telemetry, SessionObserver, Pipeline, Callable[[list[Effect]], None]]:
    """A real pipeline whose effects go to a real observer, as the daemon wires them."""
    cfg = load(env={}, overrides={"pg_dsn": "dbname=x", "amqp_url": "amqp://localhost/"})
    tel = Telemetry.create(SLOT, THRESHOLD, False)
    if tracing is not None:
        tel = Telemetry(tel.stats, tel.metrics, tracing, tel.alert)
    observer = SessionObserver(tel, SLOT)
    pipeline = Pipeline(
        cfg,
        Lsn(0x100),
        OutboxMapper(cfg.tables),
        MessageBuilder(SLOT, "db", cfg.routing_key),
        trace=observer.trace if observer.tracing else None,
    )

    def apply(effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Publish):
                observer.on_publish(e, pipeline.tracker.in_flight, pipeline.bytes_in_flight)
            elif isinstance(e, Acked):
                observer.on_acked(e, pipeline.tracker.in_flight, pipeline.bytes_in_flight)
            elif isinstance(e, Committed):
                observer.on_committed(e)
            elif isinstance(e, SendStatus):
                observer.on_status(e)
            elif isinstance(e, Finish):
                observer.on_finish(e)

    apply(pipeline.streaming_started(0.0))
    return tel, observer, pipeline, apply


def _one_transaction(
    pipeline: Pipeline, apply: Callable[[list[Effect]], None], n: int, batched: bool = False
) -> Lsn:
    """``batched``: the effects of the whole transaction are applied after it, as the daemon
    applies a drain's effects after the drain."""
    rel = Relation(
        oid=1,
        namespace="public",
        name="outbox",
        replica_identity=ord("d"),
        columns=tuple(
            Column(flags=0, name=c, type_oid=25, type_modifier=-1)
            for c in ("id", "aggregatetype", "aggregateid", "type", "payload", "traceparent")
        ),
    )
    at = 0x200
    held: list[Effect] = []

    def feed(message: bytes) -> None:
        nonlocal at
        at += 0x10
        effects = pipeline.copy_data(b"w" + struct.pack("!QQq", at, at, 0) + message, 0.0)
        if batched:
            held.extend(effects)
        else:
            apply(effects)

    feed(pg_encode(rel))
    feed(pg_encode(Begin(final_lsn=Lsn(0x900), commit_time=0, xid=5)))
    for i in range(n):
        feed(pg_encode(Insert(1, (f"e{i}".encode(), b"o", b"1", b"T", b"{}", PARENT.encode()))))
    end = Lsn(0x1000)
    feed(pg_encode(Commit(flags=0, commit_lsn=Lsn(0x900), end_lsn=end, commit_time=0)))
    apply(held)
    return end


def test_observer_counts_publishes_confirms_and_the_commit_to_confirm_histogram() -> None:
    tel, _observer, pipeline, apply = _observed_pipeline()
    end = _one_transaction(pipeline, apply, 3)
    stats = tel.stats
    assert stats.published == 3 and stats.in_flight == 3 and stats.in_flight_bytes > 0
    assert stats.oldest_unconfirmed_commit is not None
    apply(pipeline.ack(3, True))
    assert stats.confirmed == 3 and stats.in_flight == 0 and stats.in_flight_bytes == 0
    assert stats.oldest_unconfirmed_commit is None, "the transaction is confirmed"
    samples = scrape(tel.metrics)
    assert samples[("cdc_relay_commit_to_confirm_seconds_count", frozenset())] == 1
    apply(pipeline.flush_due())
    assert stats.confirmed_lsn == end and stats.last_status_update > 0


@pytest.mark.parametrize("batched", [False, True])
def test_observer_spans_get_a_confirm_event_and_end_at_the_flush(
    exporter: InMemorySpanExporter, batched: bool
) -> None:
    """Also when several events are traced before the first is published (a drain's effects
    are performed after the drain): every span stays with its own event."""
    tracing = Tracing(True, exporter=exporter)
    _tel, _observer, pipeline, apply = _observed_pipeline(tracing)
    sent: list[Publish] = []

    def keep(effects: list[Effect]) -> None:
        sent.extend(e for e in effects if isinstance(e, Publish))
        apply(effects)

    _one_transaction(pipeline, keep, 2, batched)
    apply(pipeline.ack(2, True))
    tracing._provider.force_flush()
    assert exporter.get_finished_spans() == (), "spans end when the flush is reported"
    apply(pipeline.flush_due())
    spans = finished(tracing, exporter)
    assert len(spans) == 2
    for span in spans:
        names = [e.name for e in span.events]
        assert names == [telemetry.EVENT_CONFIRM, telemetry.EVENT_FLUSH]
        assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_SPAN_ID
    # the traceparent each message carries names the span of that message's event
    by_id = {s.attributes["messaging.message.id"]: s for s in spans if s.attributes}
    for publish in sent:
        span_id = str(publish.message.headers["traceparent"]).split("-")[2]
        assert f"{by_id[publish.message.message_id].context.span_id:016x}" == span_id


def test_observer_ends_unflushed_spans_on_finish(exporter: InMemorySpanExporter) -> None:
    tracing = Tracing(True, exporter=exporter)
    tel, _observer, pipeline, apply = _observed_pipeline(tracing)
    _one_transaction(pipeline, apply, 2)
    apply(pipeline.failure(ConnectionLost("gone")))
    spans = finished(tracing, exporter)
    assert len(spans) == 2
    assert all(
        s.attributes is not None and s.attributes["cdc_relay.flushed"] is False for s in spans
    )
    assert tel.stats.in_flight == 0 and not tel.stats.streaming
