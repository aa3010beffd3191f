"""/healthz as a decision: a wedged loop or a retry loop that never progresses fails it; an idle,
blocked or standby relay does not."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cdc_relay.health import HealthServer
from cdc_relay.telemetry import Metrics, Stats

TIMEOUT = 10.0


@pytest.fixture
def server() -> Iterator[tuple[HealthServer, Stats]]:
    stats = Stats()
    health = HealthServer("127.0.0.1:0", stats, Metrics(stats, "s"), TIMEOUT).start()
    try:
        yield health, stats
    finally:
        health.stop()


def test_idle_relay_without_progress_is_alive(server: tuple[HealthServer, Stats]) -> None:
    health, stats = server
    now = time.time()
    stats.last_loop_tick = now
    stats.last_progress = now - 10 * TIMEOUT  # nothing to do for a long time: not a failure
    ok, detail = health.live()
    assert ok and detail["consecutive_failures"] == 0


def test_retry_loop_without_progress_fails(server: tuple[HealthServer, Stats]) -> None:
    health, stats = server
    now = time.time()
    stats.last_loop_tick = now
    stats.consecutive_failures = 3
    stats.last_progress = now - TIMEOUT - 1
    ok, detail = health.live()
    assert not ok and detail["consecutive_failures"] == 3
    stats.last_progress = now  # a session made progress again
    assert health.live()[0]


def test_wedged_loop_fails_whatever_the_progress(server: tuple[HealthServer, Stats]) -> None:
    health, stats = server
    now = time.time()
    stats.last_progress = now
    stats.last_loop_tick = now - TIMEOUT - 1
    ok, detail = health.live()
    assert not ok and float(str(detail["loop_tick_age_s"])) > TIMEOUT
