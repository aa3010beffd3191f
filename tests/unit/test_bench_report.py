"""The benchmark report: percentiles, the table's rows and ratios, target verdicts, anomalies.

Every result here is a small synthetic dict with the shape the harness's ``Bench`` methods
return (``_combine`` itself builds the multi-round headline drains), so the verdicts are checked
against known numbers without running a benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from benchmarks import report
from benchmarks.run import Plan, _combine, _combine_ages, _combine_idle, _combine_rounds

Result = dict[str, Any]

N = 20_000  # the quick plan's backlog
QUICK = Plan.make(quick=True, payload=150, rate=2000.0, seconds=None)
FULL = Plan.make(quick=False, payload=150, rate=2000.0, seconds=None)
DRAIN = "backlog drain >= 0.85 x raw pika ceiling"
NAIVE = "backlog drain >= 10 x naive relay"
AHEAD = "backlog drain ahead of the polling relay"
TRACING = "tracing off costs nothing measurable on the hot path"
P99_10MS = "p99 latency >= 10 x lower than polling at 2,000/s (10 ms idle poll)"
P99_100MS = "p99 latency >= 10 x lower than polling at 2,000/s (100 ms idle poll)"
STEADY = "steady 2,000/s p99 <= 25 ms (commit→consumer)"
RSS = "peak RSS <= 150 MB at 1M events"
LINEAR = report.LINEAR_TARGET


# -- builders: the shapes of Bench.ceiling_pika, cdc_drain, peer_drain, steady, idle_cost -------


def pika(n: int = N, rate: float = 10_000.0) -> Result:
    return {
        "n": n,
        "delivered": n,
        "seconds": n / rate,
        "rate": rate,
        "body_bytes": 462,
        "publisher_confirm_rate": rate,
        "cpu_us_per_event": 18.0,
    }


def drain(
    n: int = N, rate: float = 12_000.0, *, txn: int = 10, cpu: float = 36.5, rss: float = 45.0
) -> Result:
    return {
        "n": n,
        "txn_size": txn,
        "delivered": n,
        "final_depth": n,
        "seconds": n / rate,
        "rate": rate,
        "seconds_incl_startup": n / rate + 0.3,
        "cpu_us_per_event": cpu,
        "cpu_total_us_per_event": cpu + 10,
        "peak_rss_mb": rss,
        "relay_log_problems": [],
        "write_s": 0.3,
        "avg_payload_bytes": 148.2,
    }


def traced(rate: float = 4_400.0, spans: int = N, cpu: float = 200.0) -> Result:
    r = drain(rate=rate, cpu=cpu, rss=70.0)
    r.update(tracing=True, spans_exported=spans, otlp_requests=40, otlp_bytes=11_000_000)
    return r


def peer(n: int = N, rate: float = 9_500.0) -> Result:
    return {
        "n": n,
        "delivered": n,
        "seconds": n / rate,
        "rate": rate,
        "cpu_us_per_event": 23.0,
        "peak_rss_mb": 44.0,
        "write_s": 0.3,
        "avg_payload_bytes": 148.2,
    }


def recvlogical(n: int = N, txn: int = 10, rate: float = 130_000.0) -> Result:
    return {"n": n, "txn_size": txn, "seconds": n / rate, "rate": rate, "endpos": "0/552FF50"}


def lat(p99: float) -> dict[str, Any]:
    return {
        "n": 20_000,
        "p50": p99 / 2,
        "p95": p99 * 0.8,
        "p99": p99,
        "max": p99 * 2,
        "min": 0.5,
        "mean": p99 / 2,
        "cdf": [[p99 / 2, 0.5], [p99, 0.99], [p99 * 2, 1.0]],
    }


def steady(
    kind: str,
    *,
    commit_p99: float | None = None,
    created_p99: float | None = None,
    received: int = 20_000,
    poll_idle: float = 0.01,
) -> Result:
    res: Result = {
        "offered_rate": 2000.0,
        "achieved_rate": 2000.4,
        "producer_worst_lag_s": 0.001,
        "seconds": 10.0,
        "committed": 20_000,
        "received": received,
        "avg_body_bytes": 480.0,
        "cpu_us_per_event": 90.0,
        "peak_rss_mb": 45.0,
    }
    if kind == "cdc":
        res["relay_log_problems"] = []
    if kind == "polling":
        res["poll_idle_s"] = poll_idle
    if commit_p99 is not None:
        res["commit_latency_ms"] = lat(commit_p99)
    if created_p99 is not None:
        res["created_latency_ms"] = lat(created_p99)
    return res


def idle(xacts: float, cpu: float, poll_idle: float | None = None) -> Result:
    res: Result = {
        "seconds": 5.0,
        "db_xacts_per_s": xacts,
        "cpu_ms_per_s": cpu,
        "postgres_cpu_ms_per_s": 10.0,
    }
    if poll_idle is not None:
        res["poll_idle_s"] = poll_idle
    return res


def off_path(ns: float) -> Result:
    return {"ns_per_check": ns / 2.1, "checks_per_event": 2.1, "ns_per_event": ns}


def error(msg: str = "RuntimeError: boom") -> Result:
    return {"error": msg}


def healthy() -> dict[str, Result]:
    """A quick run in which every target holds (peak RSS is n/a: 1M is not run)."""
    return {
        "ceiling_pika": _combine([pika(rate=10_000.0), pika(rate=12_000.0)]),  # median 11,000
        "cdc_backlog": _combine([drain(rate=11_000.0), drain(rate=13_000.0)]),  # median 12,000
        "cdc_traced": _combine([traced(4_400.0), traced(4_600.0)]),
        "polling_backlog": _combine([peer(rate=9_000.0), peer(rate=10_000.0)]),  # median 9,500
        "tracing_off_path": off_path(9.0),
        "ceiling_recvlogical": recvlogical(),
        "naive_backlog": peer(n=2_000, rate=1_000.0),
        "floor_steady": steady("floor", commit_p99=3.0, created_p99=3.0),
        "cdc_steady": steady("cdc", commit_p99=4.0, created_p99=5.0),
        "cdc_idle": idle(0.0, 26.0),
        "polling_idle": idle(175.0, 74.0, poll_idle=0.01),
        "polling_steady": steady("polling", created_p99=60.0, poll_idle=0.01),
        "polling_steady_100ms": steady("polling", created_p99=190.0, poll_idle=0.1),
        "ceiling_pika_60000": pika(60_000, 11_000.0),
        "cdc_scale_60000": drain(60_000, 12_000.0),
        "ceiling_recvlogical_big_txn": recvlogical(100_000, 100_000, 170_000.0),
        "cdc_big_txn": drain(100_000, 12_800.0, txn=100_000, rss=47.0),
    }


def target(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [t for t in items if t["target"] == name]
    assert len(found) == 1, [t["target"] for t in items]
    return found[0]


# -- percentile, latency_summary, _spread --------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    """p99 of 1..100 is the 99th value, not an interpolation or the maximum."""
    v = [float(i) for i in range(1, 101)]
    assert report.percentile(v, 0.99) == 99.0
    assert report.percentile(v, 0.95) == 95.0
    assert report.percentile(v, 0.50) == 50.0
    assert report.percentile(v, 1.0) == 100.0
    assert report.percentile(v, 0.0) == 1.0  # clamped to the first rank


def test_percentile_of_one_value_and_of_none() -> None:
    """A single sample is every percentile; no samples is nan, not an IndexError."""
    assert report.percentile([7.5], 0.99) == 7.5
    assert report.percentile([7.5], 0.01) == 7.5
    assert math.isnan(report.percentile([], 0.99))


def test_percentile_nearest_rank_survives_float_products() -> None:
    """Nearest rank of q=0.07 over 100 values is the 7th value."""
    v = [float(i) for i in range(1, 101)]
    assert report.percentile(v, 14 / 200) == 7.0


def test_latency_summary_in_milliseconds_with_cdf() -> None:
    """Seconds in, milliseconds out; the CDF has 200 points ending at the maximum."""
    s = report.latency_summary([i / 1000 for i in range(100, 0, -1)])  # 1..100 ms, unsorted
    assert s["n"] == 100
    assert (s["p50"], s["p95"], s["p99"]) == pytest.approx((50.0, 95.0, 99.0))
    assert (s["min"], s["max"]) == pytest.approx((1.0, 100.0))
    assert s["mean"] == pytest.approx(50.5)
    cdf = s["cdf"]
    assert len(cdf) == 200
    assert cdf[-1] == [100.0, 1.0]
    assert [p[0] for p in cdf] == sorted(p[0] for p in cdf)


def test_spread() -> None:
    """(max - min) / median, and None when there is nothing to compare."""
    assert report._spread([]) is None
    assert report._spread([5.0]) is None
    assert report._spread([4.0, 4.0]) == 0.0
    assert report._spread([9.0, 10.0, 12.0]) == pytest.approx(0.3)


# -- _polling_steady -----------------------------------------------------------------------------


def test_polling_steady_runs_sorted_by_poll_interval() -> None:
    """Both steady polling runs are found, shortest poll first; other polling keys are not."""
    res = healthy()
    res = {"polling_steady_100ms": res["polling_steady_100ms"], **res}  # insertion order reversed
    idles = QUICK.steady_poll_idles
    assert report._polling_steady(res, idles) == [
        ("polling_steady", 0.01),
        ("polling_steady_100ms", 0.1),
    ]
    other = {"polling_backlog": peer(), "polling_idle": idle(1, 1)}
    assert report._polling_steady(other, idles) == []


def test_failed_polling_steady_keeps_its_poll_interval() -> None:
    """The 100 ms run's target still says 100 ms when that run failed."""
    res = {**healthy(), "polling_steady_100ms": error()}
    out = report.targets(res, QUICK)
    assert target(out, P99_100MS)["met"] is None


# -- targets: the backlog drain ------------------------------------------------------------------


def test_healthy_run_meets_every_target() -> None:
    """Every verdict of a run that holds the targets, in order; peak RSS waits for 1M."""
    out = report.targets(healthy(), QUICK)
    assert [(t["target"], t["met"]) for t in out] == [
        (DRAIN, True),
        (NAIVE, True),
        (AHEAD, True),
        (TRACING, True),
        (P99_10MS, True),
        (P99_100MS, True),
        (STEADY, True),
        (RSS, None),
        (LINEAR, True),
    ]


@pytest.mark.parametrize(("cdc", "met"), [(8_500.0, True), (8_499.0, False), (12_000.0, True)])
def test_drain_vs_pika_threshold(cdc: float, met: bool) -> None:
    """The drain must reach 0.85 of raw pika; exactly 0.85 counts."""
    res = {**healthy(), "ceiling_pika": pika(rate=10_000.0), "cdc_backlog": drain(rate=cdc)}
    t = target(report.targets(res, QUICK), DRAIN)
    assert t["met"] is met
    assert t["measured"].startswith(f"{cdc / 10_000:.2f}x ({cdc:,.0f} vs 10,000 ev/s, medians")


def test_drain_vs_pika_per_round_ratios() -> None:
    """With rounds, the verdict uses the medians and the text shows each round's own ratio."""
    res = {
        **healthy(),
        "ceiling_pika": _combine([pika(rate=10_000.0), pika(rate=12_000.0)]),
        "cdc_backlog": _combine([drain(rate=9_000.0), drain(rate=11_000.0)]),
    }
    t = target(report.targets(res, QUICK), DRAIN)
    assert t["met"] is True  # 10,000 / 11,000 = 0.91
    assert t["measured"] == "0.91x (10,000 vs 11,000 ev/s, medians; per round 0.90x, 0.92x)"


def test_drain_vs_pika_single_round_has_no_per_round_text() -> None:
    """One round has nothing to pair."""
    res = {**healthy(), "ceiling_pika": pika(rate=10_000.0), "cdc_backlog": drain(rate=9_000.0)}
    assert "per round" not in target(report.targets(res, QUICK), DRAIN)["measured"]


@pytest.mark.parametrize(("naive", "met"), [(1_200.0, True), (1_201.0, False)])
def test_drain_vs_naive(naive: float, met: bool) -> None:
    """At least ten times the naive relay's rate (12,000 / 1,200 is exactly 10)."""
    res = {**healthy(), "naive_backlog": peer(n=2_000, rate=naive)}
    t = target(report.targets(res, QUICK), NAIVE)
    assert t["met"] is met
    assert t["measured"] == f"{12_000 / naive:.2f}x (12,000 vs {naive:,.0f} ev/s)"


@pytest.mark.parametrize(("polling", "met"), [(11_999.0, True), (12_000.0, False)])
def test_drain_ahead_of_polling(polling: float, met: bool) -> None:
    """Strictly faster than the polling relay; a tie is not ahead."""
    res = {**healthy(), "polling_backlog": peer(rate=polling)}
    assert target(report.targets(res, QUICK), AHEAD)["met"] is met


# -- targets: latency ----------------------------------------------------------------------------


def test_one_p99_target_per_polling_steady_run() -> None:
    """Each polling interval gets its own target, with the raw publisher's ratio beside it."""
    out = report.targets(healthy(), QUICK)
    fast, slow = target(out, P99_10MS), target(out, P99_100MS)
    assert fast["measured"] == (
        "12.0x lower (5.0 vs 60.0 ms, created_at basis); "
        "raw pika alone at the same load: p99 3.0 ms, 20.0x"
    )
    assert slow["measured"].startswith("38.0x lower (5.0 vs 190.0 ms")


@pytest.mark.parametrize(("polling_p99", "met"), [(50.0, True), (49.9, False)])
def test_p99_target_needs_ten_times(polling_p99: float, met: bool) -> None:
    """Met only when polling's p99 is at least 10x cdc-relay's (created_at basis, p99 5 ms)."""
    res = {**healthy(), "polling_steady": steady("polling", created_p99=polling_p99)}
    assert target(report.targets(res, QUICK), P99_10MS)["met"] is met


def test_p99_target_without_floor_makes_no_floor_claim() -> None:
    """No floor measurement, no claim about the raw publisher's ratio."""
    res = healthy()
    del res["floor_steady"]
    t = target(report.targets(res, QUICK), P99_10MS)
    assert t["met"] is True
    assert "raw pika" not in t["measured"]


def test_p99_target_without_polling_runs_is_na_for_the_plan_interval() -> None:
    """No polling steady result at all still lists the target, as n/a."""
    res = {k: v for k, v in healthy().items() if not k.startswith("polling_steady")}
    out = report.targets(res, QUICK)
    latency = [t for t in out if t["target"].startswith("p99 latency")]
    assert latency == [{"target": P99_10MS, "met": None, "measured": "n/a"}]


@pytest.mark.parametrize(("p99", "received", "met"), [(25.0, 20_000, True), (25.1, 20_000, False)])
def test_steady_p99_threshold(p99: float, received: int, met: bool) -> None:
    """Commit→consumer p99 of at most 25 ms."""
    res = {**healthy(), "cdc_steady": steady("cdc", commit_p99=p99, created_p99=p99 + 1)}
    t = target(report.targets(res, QUICK), STEADY)
    assert t["met"] is met
    assert t["measured"] == f"p99 {p99:.1f} ms, received 20,000/20,000, offered 2,000/s"


def test_steady_shortfall_is_not_met_even_when_fast() -> None:
    """A low p99 means nothing if the consumer did not get every committed event."""
    res = {**healthy(), "cdc_steady": steady("cdc", commit_p99=4.0, received=19_990)}
    t = target(report.targets(res, QUICK), STEADY)
    assert t["met"] is False
    assert "received 19,990/20,000" in t["measured"]


# -- targets: peak RSS and linearity -------------------------------------------------------------


def test_peak_rss_is_na_below_one_million() -> None:
    """A quick run reports the worst RSS but gives no verdict."""
    t = target(report.targets(healthy(), QUICK), RSS)
    assert t["met"] is None
    assert t["measured"] == "47 MB max over drains up to N=100k (1M not run in this mode)"


@pytest.mark.parametrize(("big_rss", "met"), [(150.0, True), (160.0, False)])
def test_peak_rss_evaluated_at_one_million(big_rss: float, met: bool) -> None:
    """At N=1M the worst RSS over every drain decides."""
    res = {
        **healthy(),
        "cdc_scale_1000000": drain(1_000_000, 12_000.0, rss=120.0),
        "cdc_big_txn": drain(1_000_000, 12_000.0, txn=1_000_000, rss=big_rss),
    }
    del res["cdc_scale_60000"], res["ceiling_pika_60000"]
    t = target(report.targets(res, FULL), RSS)
    assert t["met"] is met
    assert t["measured"] == f"{big_rss:.0f} MB max over drains up to N=1M"


def test_linearity_met_with_broker_comparison() -> None:
    """Per-event time flat from 20k to 60k; the one big transaction is not part of it."""
    res = {
        **healthy(),
        "ceiling_pika_60000": pika(60_000, 10_000.0),  # pika median 11,000 at 20k
        "cdc_big_txn": drain(100_000, 1_000.0, txn=100_000),  # 12x slower per event: ignored
    }
    t = target(report.targets(res, QUICK), LINEAR)
    assert t["met"] is True
    assert t["measured"] == (
        "20k: 1.67 s, 60k: 5.00 s -> per-event time x1.00; raw pika over the same range x1.10, "
        "so the relay's own x0.91"
    )


@pytest.mark.parametrize(("pika_rate", "met"), [(9_000.0, True), (11_000.0, False)])
def test_linearity_discounts_the_brokers_own_slowdown(pika_rate: float, met: bool) -> None:
    """The relay slows x1.40 from 20k to 60k; if the broker alone slowed x1.22 over the same
    range the relay's own growth is x1.15 (met); if the broker did not slow, x1.40 is not."""
    res = {
        **healthy(),
        "cdc_scale_60000": drain(60_000, 12_000.0 / 1.4),
        "ceiling_pika_60000": pika(60_000, pika_rate),
    }
    t = target(report.targets(res, QUICK), LINEAR)
    assert t["met"] is met
    assert "per-event time x1.40" in t["measured"]
    assert f"so the relay's own x{1.4 * pika_rate / 11_000.0:.2f}" in t["measured"]


@pytest.mark.parametrize(("scale_rate", "met"), [(9_700.0, True), (9_500.0, False)])
def test_linearity_threshold(scale_rate: float, met: bool) -> None:
    """Per-event time may grow at most 1.25x (12,000 → 9,700 ev/s is 1.24x, → 9,500 1.26x)."""
    res = {**healthy(), "cdc_scale_60000": drain(60_000, scale_rate)}
    t = target(report.targets(res, QUICK), LINEAR)
    assert t["met"] is met
    assert f"x{12_000 / scale_rate:.2f}" in t["measured"]


def test_linearity_needs_two_batched_drains() -> None:
    """One drain size plus the big transaction is not a trend."""
    res = {**healthy(), "cdc_scale_60000": error()}
    assert target(report.targets(res, QUICK), LINEAR) == {
        "target": LINEAR,
        "met": None,
        "measured": "n/a",
    }


# -- targets: failures ---------------------------------------------------------------------------


def test_failed_scenarios_give_na_not_exceptions() -> None:
    """A scenario that errored turns its targets into n/a; the others are still judged."""
    res = {**healthy(), "cdc_backlog": error(), "cdc_steady": error()}
    out = report.targets(res, QUICK)
    for name in (DRAIN, NAIVE, AHEAD, TRACING, P99_10MS, P99_100MS, STEADY, LINEAR):
        assert target(out, name) == {"target": name, "met": None, "measured": "n/a"}
    assert target(out, RSS)["measured"].startswith("47 MB")  # still from the other drains


def test_failed_rounds_of_combined_drains_give_na() -> None:
    """Every round failed: ``_combine`` keeps the error, the targets say n/a."""
    res = {**healthy(), "ceiling_pika": _combine([error(), error()])}
    out = report.targets(res, QUICK)
    assert target(out, DRAIN)["met"] is None
    assert target(out, NAIVE)["met"] is True


def test_peak_rss_target_listed_when_every_drain_failed() -> None:
    """The reader sees every target, even one nothing could measure."""
    res = {**healthy(), "cdc_backlog": error(), "cdc_scale_60000": error(), "cdc_big_txn": error()}
    assert target(report.targets(res, QUICK), RSS)["met"] is None


def test_targets_text_marks() -> None:
    """One line per target with its verdict mark."""
    text = report.targets_text(
        [
            {"target": "a", "met": True, "measured": "1"},
            {"target": "b", "met": False, "measured": "2"},
            {"target": "c", "met": None, "measured": "n/a"},
        ]
    )
    assert text.splitlines() == [
        "targets:",
        "  [MET    ] a: 1",
        "  [NOT MET] b: 2",
        "  [n/a    ] c: n/a",
    ]


# -- _tracing_target -----------------------------------------------------------------------------


def test_tracing_off_path_below_noise_is_met() -> None:
    """9 ns against 36.5 µs of CPU per event is far under 1% and under the drains' noise."""
    name, met, measured = report._tracing_target(healthy())
    assert name == TRACING
    assert met is True
    assert measured.startswith("off path 9 ns/event = 0.02% of the relay's 36.5 µs/event")
    # the rounds' rate spread (2,000 / 12,000) is the largest noise here
    assert "the drains' own noise is 16.7%" in measured


def test_tracing_noise_floor_is_one_clock_tick() -> None:
    """With one round there is no spread; one CPU tick over the drain's CPU time remains."""
    res = {**healthy(), "cdc_backlog": drain(rate=12_000.0, cpu=36.5)}
    tick = 1 / report.CLK_TCK / (36.5e-6 * N)
    assert f"noise is {tick:.1%}" in report._tracing_target(res)[2]


def test_tracing_off_path_over_one_percent_is_not_met() -> None:
    """1 µs per event is 2.7% of the relay's CPU: measurable, whatever the noise."""
    res = {**healthy(), "tracing_off_path": off_path(1_000.0)}
    _, met, measured = report._tracing_target(res)
    assert met is False
    assert "= 2.74% of the relay's" in measured


def test_tracing_off_path_above_noise_is_not_met() -> None:
    """Under 1% is not enough when the drains are steadier than the off path's cost."""
    steady_rounds = [drain(1_000_000, 12_000.0), drain(1_000_000, 12_010.0)]
    res = {**healthy(), "tracing_off_path": off_path(300.0), "cdc_backlog": _combine(steady_rounds)}
    _, met, measured = report._tracing_target(res)
    assert met is False  # 0.82% of CPU, noise 0.08%
    assert "0.82%" in measured


@pytest.mark.parametrize("missing", ["tracing_off_path", "cdc_backlog"])
def test_tracing_target_na_without_its_pieces(missing: str) -> None:
    """No off-path timing or no untraced drain: nothing to compare."""
    res = healthy()
    del res[missing]
    assert report._tracing_target(res) == (TRACING, None, "n/a")
    res[missing] = error()
    assert report._tracing_target(res) == (TRACING, None, "n/a")


def test_tracing_on_reports_minimum_spans_exported() -> None:
    """The spans line is the worst round: 'at least' what every round exported."""
    res = {**healthy(), "cdc_traced": _combine([traced(4_400.0, N), traced(4_600.0, 15_000)])}
    measured = report._tracing_target(res)[2]
    assert "; tracing on: 200 µs/event (5.5x), 0.38x the rate" in measured
    assert measured.endswith("at least 15,000 of 20,000 spans exported per round")


def test_tracing_without_traced_drain_still_judges_off_path() -> None:
    """The on/off comparison is extra; the verdict does not depend on it."""
    res = healthy()
    del res["cdc_traced"]
    _, met, measured = report._tracing_target(res)
    assert met is True
    assert "tracing on" not in measured


def test_tracing_target_survives_a_zero_cpu_round() -> None:
    """A zero CPU reading must not crash the whole report."""
    res = {**healthy(), "cdc_backlog": _combine([drain(cpu=0.0), drain(cpu=36.5)])}
    assert report._tracing_target(res)[0] == TRACING


# -- anomalies -----------------------------------------------------------------------------------


def test_no_anomalies_in_a_healthy_run() -> None:
    """Clean numbers and an expected relay warning produce nothing."""
    res = healthy()
    res["cdc_big_txn"]["relay_log_problems"] = [
        "2026-11-27T23:45:39.571Z warning propagation slower than threshold: events are late"
    ]
    assert report.anomalies(res) == []


def test_anomaly_delivered_short() -> None:
    """The queue never reached N during the measurement."""
    r = pika()
    r["delivered"] = 19_990
    assert report.anomalies({"ceiling_pika": r}) == [
        "ceiling_pika: the queue held 19,990 when 20,000 were expected"
    ]


def test_anomaly_duplicates_and_loss() -> None:
    """Final depth above N means duplicates, below N means loss."""
    dup, lost = drain(), drain()
    dup["final_depth"] = 20_005
    lost["final_depth"] = 19_990
    assert report.anomalies({"cdc_scale_60000": dup, "cdc_big_txn": lost}) == [
        "cdc_scale_60000: after the relay stopped the queue held 20,005 for 20,000 events "
        "(duplicates were published)",
        "cdc_big_txn: only 19,990 of 20,000 events arrived",
    ]


def test_anomaly_consumer_shortfall() -> None:
    """A steady run whose consumer got fewer than were committed."""
    res = {"polling_steady": steady("polling", created_p99=60.0, received=19_000)}
    assert report.anomalies(res) == ["polling_steady: consumer got 19,000 of 20,000"]


def test_anomaly_relay_log_lines_except_expected_warnings() -> None:
    """Unexpected relay log lines are reported; the designed-in warnings are not."""
    r = drain()
    r["relay_log_problems"] = [
        "warning propagation slower than threshold: events are late to the broker",
        "Queue full, dropping Span.",
        "error publish failed: channel closed",
    ]
    assert report.anomalies({"cdc_traced": r}) == [
        "cdc_traced: relay log: error publish failed: channel closed"
    ]


def test_anomalies_come_from_each_round_once() -> None:
    """A bad round of a combined drain is reported once; failed scenarios are skipped."""
    bad = drain(rate=11_000.0)
    bad["final_depth"] = N + 3
    res = {"cdc_backlog": _combine([bad, drain(rate=13_000.0)]), "naive_backlog": error()}
    assert report.anomalies(res) == [
        "cdc_backlog: after the relay stopped the queue held 20,003 for 20,000 events "
        "(duplicates were published)"
    ]


# -- rows and table ------------------------------------------------------------------------------


def by_key(all_rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [r for r in all_rows if r["key"] == key]


def test_rows_one_per_scenario() -> None:
    """Every measured scenario has a row; cdc_backlog also heads the scale section."""
    keys = [r["key"] for r in report.rows(healthy(), QUICK)]
    assert keys == [
        "ceiling_pika",
        "ceiling_recvlogical",
        "cdc_backlog",
        "cdc_traced",
        "polling_backlog",
        "naive_backlog",
        "floor_steady:commit",
        "cdc_steady:commit",
        "cdc_steady:created",
        "polling_steady:created",
        "polling_steady_100ms:created",
        "cdc_idle",
        "polling_idle",
        "cdc_backlog",
        "ceiling_pika_60000",
        "cdc_scale_60000",
        "ceiling_recvlogical_big_txn",
        "cdc_big_txn",
    ]


def test_rows_throughput_ratios_from_medians() -> None:
    """vs pika / vs poll divide the combined (median) rates, not any single round's."""
    out = report.rows(healthy(), QUICK)
    cdc = by_key(out, "cdc_backlog")[0]
    assert cdc["value"] == 12_000.0
    assert cdc["vs_pika"] == pytest.approx(12_000 / 11_000)
    assert cdc["vs_polling"] == pytest.approx(12_000 / 9_500)
    assert cdc["text"] == "12,000 ev/s in 1.67 s, median of 2"
    assert by_key(out, "ceiling_pika")[0]["vs_pika"] == pytest.approx(1.0)


def test_rows_scale_ratio_against_pika_at_same_n() -> None:
    """A scale drain is compared with the pika ceiling at its own N when that was measured."""
    res = {**healthy(), "ceiling_pika_60000": pika(60_000, 15_000.0)}
    out = report.rows(res, QUICK)
    assert by_key(out, "cdc_scale_60000")[0]["vs_pika"] == pytest.approx(12_000 / 15_000)
    del res["ceiling_pika_60000"]
    out = report.rows(res, QUICK)
    assert by_key(out, "cdc_scale_60000")[0]["vs_pika"] == pytest.approx(12_000 / 11_000)


def test_rows_latency_ratios() -> None:
    """Latency rows divide p99s: by the floor (vs pika) and, created_at basis only, by polling."""
    out = report.rows(healthy(), QUICK)
    commit = by_key(out, "cdc_steady:commit")[0]
    created = by_key(out, "cdc_steady:created")[0]
    slow = by_key(out, "polling_steady_100ms:created")[0]
    assert (commit["value"], commit["vs_pika"], commit["vs_polling"]) == (4.0, 4.0 / 3.0, None)
    assert (created["vs_pika"], created["vs_polling"]) == (5.0 / 3.0, 5.0 / 60.0)
    assert slow["vs_polling"] == pytest.approx(190.0 / 60.0)
    assert slow["name"] == "polling 2,000/s, 100 ms idle: created_at→consumer"
    assert commit["text"] == "p50 2.0 p95 3.2 p99 4.0 max 8 ms"


def test_rows_notes_on_delivery_and_shortfall() -> None:
    """Rows say when the queue or the consumer fell short."""
    bad = drain(60_000, 12_000.0)
    bad.update(delivered=59_000, final_depth=59_500)
    res = {
        **healthy(),
        "cdc_scale_60000": bad,
        "cdc_steady": steady("cdc", commit_p99=4.0, created_p99=5.0, received=19_999),
    }
    out = report.rows(res, QUICK)
    assert by_key(out, "cdc_scale_60000")[0]["text"].endswith(
        " (delivered 59,000 of 60,000) (queue ends with 59,500: duplicates or loss)"
    )
    assert by_key(out, "cdc_steady:commit")[0]["text"].endswith(" ms (got 19999/20000)")


def test_rows_failed_scenarios() -> None:
    """An errored scenario still has its row, marked FAILED, with no figures."""
    res = {**healthy(), "cdc_backlog": error(), "cdc_steady": error(), "cdc_idle": error()}
    out = report.rows(res, QUICK)
    failed = [r for r in out if r["text"].startswith("FAILED: RuntimeError: boom")]
    assert [r["key"] for r in failed] == [
        "cdc_backlog",
        "cdc_steady",
        "cdc_steady",
        "cdc_idle",
        "cdc_backlog",  # again in the scale section
    ]
    assert all("value" not in r for r in failed)
    assert by_key(out, "cdc_backlog")[1]["name"] == "cdc-relay drain N=20k (10 ev/txn)"


def test_rows_idle() -> None:
    """Idle rows carry the database's transactions and the relay's CPU per second."""
    out = report.rows(healthy(), QUICK)
    polling = by_key(out, "polling_idle")[0]
    assert polling["name"] == "idle: polling, 10 ms poll"
    assert polling["value"] == 175.0
    assert polling["relay_cpu_ms_per_s"] == 74.0
    assert polling["text"] == "175 db txn/s, postgres CPU 10.0 ms/s"
    assert by_key(out, "cdc_idle")[0]["unit"] == "idle"


def test_table_renders_every_row() -> None:
    """The table shows each scenario name, the ratios, FAILED rows and the scale heading once."""
    res = {**healthy(), "naive_backlog": error("TimeoutError: stuck")}
    all_rows = report.rows(res, QUICK)
    text = report.table(all_rows)
    for r in all_rows:
        assert r["name"] in text
    assert "FAILED: TimeoutError: stuck" in text
    assert text.count("scale (cdc-relay;") == 1
    assert "1.09x" in text  # cdc vs pika: 12,000 / 11,000
    assert "26.0 ms/s" in text  # the cdc relay's idle CPU
    lines = text.splitlines()
    assert lines[0].startswith("scenario")
    assert lines.index(next(x for x in lines if x.startswith("scale ("))) < lines.index(
        next(x for x in lines if x.startswith("cdc-relay drain N=20k"))
    )


def test_a_failed_round_of_a_combined_drain_is_an_anomaly() -> None:
    """One bad round out of three still yields a median, but the report must say so."""
    res = {**healthy(), "cdc_backlog": _combine([drain(rate=11_000.0), error(), drain()])}
    assert "cdc_backlog: 1 of 3 rounds failed" in report.anomalies(res)
    assert not any("rounds failed" in a for a in report.anomalies(healthy()))


# -- the shapes section --------------------------------------------------------------------------
# Builders in the shapes of Bench.ceiling_pika (same shape / minimal), cdc_drain with a payload
# and Bench.idle_cost("cdc"); a shape's rounds are combined by _combine, as the harness does.

RELAY_PROPS = [
    "app_id",
    "content_type",
    "delivery_mode",
    "headers",
    "message_id",
    "timestamp",
    "type",
]
RELAY_HEADERS = ["aggregate_id", "aggregate_type", "source_lsn"]
SHAPE_LABELS = {s.key: s.label for s in QUICK.shapes}


def ceiling(n: int, rate: float, *, minimal: bool = False, body: int = 468) -> Result:
    return {
        "n": n,
        "delivered": n,
        "seconds": n / rate,
        "rate": rate,
        "body_bytes": body,
        "properties": ["delivery_mode", "message_id"] if minimal else RELAY_PROPS,
        "headers": [] if minimal else RELAY_HEADERS,
        "minimal": minimal,
        "publisher_confirm_rate": rate,
        "cpu_us_per_event": 12.0 if minimal else 18.0,
        "broker_cpu_us_per_event": 70.0 if minimal else 90.0,
    }


def shape_drain(
    n: int,
    rate: float,
    *,
    txn: int = 1,
    cpu: float = 40.0,
    walsender: float | None = 8.0,
    body: int = 468,
    startup: float = 0.6,
    headers: list[str] | None = None,
) -> Result:
    r = drain(n, rate, txn=txn, cpu=cpu)
    r.update(
        startup_s=startup,
        walsender_cpu_us_per_event=walsender,
        broker_cpu_us_per_event=95.0,
        message={
            "body_bytes": body,
            "properties": RELAY_PROPS,
            "headers": RELAY_HEADERS if headers is None else headers,
        },
    )
    return r


def cdc_idle(cpu: float, startup: float = 0.5, walsender: float = 0.4) -> Result:
    r = idle(0.2, cpu)
    r.update(seconds=10.0, startup_s=startup, walsender_cpu_ms_per_s=walsender)
    return r


def shape_results(
    plan: Plan = QUICK,
    same: Sequence[float] = (10_000.0, 11_000.0),
    minimal: Sequence[float] = (11_000.0, 11_800.0),
    relay: Sequence[float] = (10_000.0, 10_600.0),
) -> dict[str, Result]:
    """Every shape of ``plan`` with the same round rates (by default relay/same 0.98, relay/
    minimal 0.904: every target met), bodies of the relay's size, and the idle rounds."""
    res: dict[str, Result] = {}
    for shape in plan.shapes:
        body = 468 + shape.payload - 150
        key = f"shape_{shape.key}"
        res[f"{key}_same"] = _combine([ceiling(shape.n, x, body=body) for x in same])
        res[f"{key}_minimal"] = _combine(
            [ceiling(shape.n, x, minimal=True, body=shape.payload - 8) for x in minimal]
        )
        res[f"{key}_relay"] = _combine(
            [shape_drain(shape.n, x, txn=shape.txn_size, body=body) for x in relay]
        )
    res["cdc_idle"] = _combine_idle([cdc_idle(7.0, 0.5), cdc_idle(9.0, 0.7)])
    return res


def shape_row(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    found = [r for r in rows if r["key"] == key]
    assert len(found) == 1
    return found[0]


def same_target(key: str) -> str:
    return f"shape {SHAPE_LABELS[key]}: >= 0.95 x same-shape ceiling"


def minimal_target(key: str) -> str:
    return f"shape {SHAPE_LABELS[key]}: >= 0.90 x minimal ceiling"


BYTES_2KB = "shape 2 KB payload, 1 ev/txn: >= 0.90 x both ceilings in bytes/s"


def test_plan_shapes_quick_and_full() -> None:
    """The seven shapes with their N: 1M / 100k rows in the one transaction, 64 KB shrunk."""
    quick = [(s.key, s.n, s.txn_size, s.payload) for s in QUICK.shapes]
    assert quick == [
        ("txn1", 20_000, 1, 150),
        ("txn3", 20_000, 3, 150),
        ("txn1000", 20_000, 1000, 150),
        ("bigtxn", 100_000, 100_000, 150),
        ("kb2", 10_000, 1, 2048),
        ("kb64", 2_000, 1, 65536),
        ("kb64json", 2_000, 1, 65536),
    ]
    assert [s.key for s in QUICK.shapes if s.payload_type != "jsonb"] == ["kb64json"]
    full = {s.key: s.n for s in FULL.shapes}
    assert (full["txn1"], full["bigtxn"], full["kb2"], full["kb64"]) == (
        100_000,
        1_000_000,
        50_000,
        10_000,
    )
    assert [s.key for s in QUICK.shapes if s.bytes_target] == ["kb2"]
    assert QUICK.sections == ("main", "shapes", "recovery", "tls", "scale", "consumer")
    only = Plan.make(quick=True, payload=150, rate=2000.0, seconds=None, only="shapes")
    assert only.sections == ("shapes",)
    assert (QUICK.recovery, FULL.recovery) == (100_000, 1_000_000)
    assert (QUICK.consumer_seconds, FULL.consumer_seconds) == (12.0, 30.0)
    assert (QUICK.consumer_light_rate, QUICK.consumer_light_seconds) == (500.0, 10.0)
    assert (QUICK.rounds, FULL.rounds) == (2, 3)


def test_every_shape_met() -> None:
    """Relay at 0.98x the same-shape ceiling and 0.90x the minimal one: every target met,
    in shape order, two lines per shape and the bytes line for 2 KB."""
    out = report.shape_targets(shape_results(), QUICK)
    expected: list[tuple[str, bool | None]] = []
    for shape in QUICK.shapes:
        expected += [(same_target(shape.key), True), (minimal_target(shape.key), True)]
        if shape.key == "kb2":
            expected.append((BYTES_2KB, True))
    assert [(t["target"], t["met"]) for t in out] == expected


@pytest.mark.parametrize(
    ("relay", "met_same", "met_minimal"),
    [
        ((9_500.0, 11_500.0), True, True),  # median 10,500: 1.00x, 0.92x
        ((9_900.0, 10_100.0), True, False),  # median 10,000: 0.952x, 0.877x
        ((9_000.0, 10_000.0), False, False),  # median 9,500: 0.905x, 0.833x
    ],
)
def test_shape_thresholds_use_medians(
    relay: tuple[float, float], met_same: bool, met_minimal: bool
) -> None:
    """The verdicts divide the median of the relay's rounds by each ceiling's median
    (same shape 10,500, minimal 11,400)."""
    res = shape_results(same=(10_000.0, 11_000.0), minimal=(11_000.0, 11_800.0), relay=relay)
    out = report.shape_targets(res, QUICK)
    assert target(out, same_target("txn1"))["met"] is met_same
    assert target(out, minimal_target("txn1"))["met"] is met_minimal


def test_shape_threshold_exactly_met() -> None:
    """Exactly 0.95 and exactly 0.90 count as met."""
    res = shape_results(
        same=(10_000.0, 10_000.0), minimal=(10_500.0, 10_600.0), relay=(9_500.0,) * 2
    )
    out = report.shape_targets(res, QUICK)
    assert target(out, same_target("txn3"))["met"] is True
    assert target(out, minimal_target("txn3"))["met"] is True  # 9,500 / 10,550 = 0.9005
    res = shape_results(same=(10_000.0, 10_000.0), relay=(9_499.0, 9_499.0))
    assert target(report.shape_targets(res, QUICK), same_target("txn3"))["met"] is False


def test_shape_target_text_has_medians_and_every_round() -> None:
    """Full mode: the median of three rounds (not the mean), and each round's own ratio."""
    res = shape_results(
        FULL,
        same=(10_000.0, 12_000.0, 11_000.0),
        minimal=(12_000.0, 12_500.0, 13_000.0),
        relay=(8_000.0, 9_900.0, 11_000.0),
    )
    t = target(report.shape_targets(res, FULL), same_target("txn1"))
    assert t["met"] is False  # 9,900 / 11,000 = 0.90 (the mean would be 9,633)
    assert t["measured"] == ("0.90x (9,900 vs 11,000 ev/s, medians; per round 0.80x, 0.82x, 1.00x)")


def test_shape_rows_every_round() -> None:
    """A row carries every round's rate of each publisher, the per-round ratios, the medians
    of relay and walsender CPU per event, and the bodies."""
    res = shape_results()
    res["shape_txn1_relay"] = _combine(
        [shape_drain(N, 10_000.0, cpu=40.0, walsender=7.0), shape_drain(N, 10_600.0, cpu=50.0)]
    )
    row = shape_row(report.shape_rows(res, QUICK), "shape_txn1")
    assert row["round_rates"] == {
        "same": [10_000.0, 11_000.0],
        "minimal": [11_000.0, 11_800.0],
        "relay": [10_000.0, 10_600.0],
    }
    assert row["relay_rate"] == 10_300.0
    assert row["vs_same"] == pytest.approx(10_300 / 10_500)
    assert row["round_vs_same"] == pytest.approx([1.0, 10_600 / 11_000])
    assert row["relay_cpu_us_per_event"] == 45.0
    assert row["walsender_cpu_us_per_event"] == 7.5
    assert row["body_bytes"] == {"relay": 468.0, "same": 468.0, "minimal": 142.0}
    assert row["shape_mismatch"] is None
    assert row["errors"] == {}
    assert "bytes_per_s" not in row


def test_shapes_table_prints_every_round() -> None:
    """Each round's rate of each publisher appears in the table, under its shape's line."""
    res = shape_results(
        FULL, same=(10_001.0, 10_002.0, 10_003.0), minimal=(11_001.0, 11_002.0, 11_003.0),
        relay=(9_501.0, 9_502.0, 9_503.0),
    )  # fmt: skip
    text = report.shapes_table(report.shape_rows(res, FULL), FULL)
    lines = text.splitlines()
    assert "median of 3 interleaved rounds" in lines[0]
    for shape in FULL.shapes:
        i = next(i for i, x in enumerate(lines) if x.startswith(shape.label))
        assert lines[i + 1] == (
            "    rounds ev/s: same 10,001 10,002 10,003 | minimal 11,001 11,002 11,003 | "
            "relay 9,501 9,502 9,503"
        )
        assert lines[i + 2].startswith("    rounds: vs same 0.95x 0.95x 0.95x | vs minimal 0.86x")
        assert "same properties and headers" in lines[i + 3]
    assert "0.95x" in text


def test_shape_failed_round_quick_is_na_and_printed() -> None:
    """Quick mode (2 rounds): one failed relay round leaves one, too few for a verdict; the
    failed round is printed as such."""
    res = shape_results()
    res["shape_txn3_relay"] = _combine([shape_drain(N, 10_000.0, txn=3), error()])
    out = report.shape_targets(res, QUICK)
    t = target(out, same_target("txn3"))
    assert t == {
        "target": same_target("txn3"),
        "met": None,
        "measured": "n/a (relay 1, ceiling 2 of 2 rounds succeeded (a verdict needs 2))",
    }
    rows = report.shape_rows(res, QUICK)
    row = shape_row(rows, "shape_txn3")
    assert row["round_rates"]["relay"] == [10_000.0, None]
    assert row["round_vs_same"] == [1.0, None]
    text = report.shapes_table(rows, QUICK)
    assert "relay 10,000 failed" in text
    assert "vs same 1.00x failed" in text
    assert "shape_txn3_relay: 1 of 2 rounds failed" in report.anomalies(res)


def test_shape_failed_round_full_still_judged() -> None:
    """Full mode: two good rounds of three still give a verdict, from their median."""
    res = shape_results(FULL, same=(10_000.0,) * 3, minimal=(10_000.0,) * 3, relay=(9_800.0,) * 3)
    res["shape_txn1_same"] = _combine([ceiling(N, 10_000.0), error(), ceiling(N, 10_200.0)])
    t = target(report.shape_targets(res, FULL), same_target("txn1"))
    assert t["met"] is True  # 9,800 / 10,100
    assert t["measured"].endswith("per round 0.98x, failed, 0.96x)")


def test_shape_every_round_failed() -> None:
    """A publisher none of whose rounds ran: the row says FAILED with the error, no verdict."""
    res = shape_results()
    res["shape_kb64_minimal"] = _combine([error("ChildError: pika died"), error()])
    rows = report.shape_rows(res, QUICK)
    row = shape_row(rows, "shape_kb64")
    assert row["errors"] == {"minimal": "ChildError: pika died"}
    assert row["minimal_rate"] is None and row["vs_minimal"] is None
    text = report.shapes_table(rows, QUICK)
    assert "    minimal: every round FAILED: ChildError: pika died" in text
    out = report.shape_targets(res, QUICK)
    assert target(out, minimal_target("kb64"))["met"] is None
    assert target(out, same_target("kb64"))["met"] is True  # the other ceiling still judges


def test_shape_not_run_has_no_row_or_target() -> None:
    """A shape the run did not reach is left out, not reported as failed."""
    res = {k: v for k, v in shape_results().items() if not k.startswith("shape_kb64")}
    assert "shape_kb64" not in [r["key"] for r in report.shape_rows(res, QUICK)]
    names = [t["target"] for t in report.shape_targets(res, QUICK)]
    assert not any("64 KB" in n for n in names)
    assert len(names) == 11


@pytest.mark.parametrize(
    ("relay", "met"), [((9_000.0, 9_000.0), True), ((8_000.0, 8_000.0), False)]
)
def test_two_kb_bytes_target(relay: tuple[float, float], met: bool) -> None:
    """Bytes/s are rate x message body: the relay's (envelope) body against the same-shape
    ceiling's equal one and the minimal ceiling's payload-only body."""
    res = shape_results(same=(9_500.0, 9_500.0), minimal=(11_000.0, 11_000.0), relay=relay)
    row = shape_row(report.shape_rows(res, QUICK), "shape_kb2")
    assert row["body_bytes"] == {"relay": 2366.0, "same": 2366.0, "minimal": 2040.0}
    assert row["bytes_per_s"]["relay"] == pytest.approx(relay[0] * 2366)
    assert row["bytes_vs_minimal"] == pytest.approx(relay[0] * 2366 / (11_000 * 2040))
    t = target(report.shape_targets(res, QUICK), BYTES_2KB)
    assert t["met"] is met
    same, minimal = relay[0] / 9_500, relay[0] * 2366 / (11_000 * 2040)
    assert t["measured"].startswith(f"same shape {same:.2f}x, minimal {minimal:.2f}x (relay ")
    text = report.shapes_table(report.shape_rows(res, QUICK), QUICK)
    assert "    bytes/s (message bodies): relay " in text


def test_two_kb_bytes_target_without_relay_body_is_na() -> None:
    """No message sampled off the relay's queue: its bytes/s is unknown, no verdict."""
    res = shape_results()
    for s in res["shape_kb2_relay"]["samples"]:
        del s["message"]
    del res["shape_kb2_relay"]["message"]
    assert target(report.shape_targets(res, QUICK), BYTES_2KB) == {
        "target": BYTES_2KB,
        "met": None,
        "measured": "n/a",
    }


def test_same_shape_mismatch_is_shown_and_an_anomaly() -> None:
    """The same-shape ceiling must send the relay's properties, headers and body size."""
    res = shape_results()
    assert not [a for a in report.anomalies(res) if "same-shape" in a]
    res["shape_txn1_relay"] = _combine(
        [shape_drain(N, 10_000.0, body=600, headers=[*RELAY_HEADERS, "traceparent"])] * 2
    )
    diff = report.shape_mismatch(res["shape_txn1_same"], res["shape_txn1_relay"])
    assert diff == (
        "headers ['aggregate_id', 'aggregate_type', 'source_lsn'] vs ['aggregate_id', "
        "'aggregate_type', 'source_lsn', 'traceparent']; body 468 B vs the relay's 600 B"
    )
    assert f"shape_txn1_relay: the same-shape ceiling does not send the relay's shape: {diff}" in (
        report.anomalies(res)
    )
    text = report.shapes_table(report.shape_rows(res, QUICK), QUICK)
    assert "(DIFFERENT: headers" in text


def test_shape_walsender_unknown() -> None:
    """No walsender pid found: its column shows a dash, the relay's CPU is still there."""
    res = shape_results()
    res["shape_txn1_relay"] = _combine([shape_drain(N, 10_000.0, walsender=None)] * 2)
    rows = report.shape_rows(res, QUICK)
    assert shape_row(rows, "shape_txn1")["walsender_cpu_us_per_event"] is None
    line = next(x for x in report.shapes_table(rows, QUICK).splitlines() if x.startswith("1 ev"))
    assert line.split()[-2:] == ["40.0", "–"]


def test_idle_and_startup_rows() -> None:
    """Idle: the relay's own CPU ms/s, median of the rounds with each round; start-up: the
    median over every relay start of the section (idle rounds and drains)."""
    res = shape_results()
    rows = report.shape_rows(res, QUICK)
    idle_r = shape_row(rows, "cdc_idle")
    assert idle_r["relay_cpu_ms_per_s"] == 8.0
    assert idle_r["round_relay_cpu_ms_per_s"] == [7.0, 9.0]
    assert idle_r["round_startup_s"] == [0.5, 0.7]
    start = shape_row(rows, "startup")
    # 7 shapes x 2 relay rounds at 0.6 s, and the idle rounds at 0.5 and 0.7 s
    assert (start["starts"], start["startup_s"], start["min_s"], start["max_s"]) == (
        16,
        0.6,
        0.5,
        0.7,
    )
    text = report.shapes_table(rows, QUICK)
    assert (
        "idle, nothing written (10 s per round): relay CPU 8.0 ms/s (rounds 7.0 9.0), walsender "
        "0.4 ms/s, all of PostgreSQL 10.0 ms/s, 0 db txn/s"
    ) in text
    assert (
        'start-up, spawn of `cdc-relay run` → its "streaming" record: idle rounds 0.50 0.70 s; '
        "median 0.60 s over all 16 starts in this section (0.50–0.70 s)"
    ) in text


def test_idle_every_round_failed() -> None:
    """An idle measurement that never worked is printed as failed, not as zero."""
    res = {**shape_results(), "cdc_idle": _combine_idle([error("ChildError: x"), error()])}
    rows = report.shape_rows(res, QUICK)
    assert shape_row(rows, "cdc_idle")["errors"] == {"idle": "ChildError: x"}
    assert "idle: every round FAILED: ChildError: x" in report.shapes_table(rows, QUICK)


def test_combine_rounds() -> None:
    """``key#r`` results become one ``key`` each: rates by _combine (peak RSS: the worst
    round), idle rounds by _combine_idle (medians of each figure)."""
    res: dict[str, Result] = {
        "servers": {"postgres": "15"},
        "shape_txn1_relay#1": shape_drain(N, 9_000.0) | {"peak_rss_mb": 50.0},
        "cdc_idle#1": cdc_idle(6.0, 0.4),
        "shape_txn1_relay#2": shape_drain(N, 11_000.0) | {"peak_rss_mb": 40.0},
        "cdc_idle#2": error(),
        "cdc_idle#3": cdc_idle(10.0, 0.8),
        "shape_txn1_relay#3": shape_drain(N, 10_000.0) | {"peak_rss_mb": 45.0},
    }
    _combine_rounds(res)
    assert sorted(res) == ["cdc_idle", "servers", "shape_txn1_relay"]
    relay = res["shape_txn1_relay"]
    assert (relay["rate"], relay["round_rates"], relay["peak_rss_mb"]) == (
        10_000.0,
        [9_000.0, 11_000.0, 10_000.0],
        50.0,
    )
    idle_r = res["cdc_idle"]
    assert (idle_r["cpu_ms_per_s"], idle_r["failed_rounds"]) == (8.0, 1)
    assert idle_r["startup_s"] == pytest.approx(0.6)
    assert idle_r["round_cpu_ms_per_s"] == [6.0, 10.0]
    assert len(idle_r["samples"]) == 3


def test_big_txn_from_the_shapes_section() -> None:
    """Without a standalone big-transaction drain the scale row and the peak RSS target use
    the shapes section's (rounds, worst RSS)."""
    res = {**healthy(), **shape_results(FULL)}
    del res["cdc_big_txn"]
    res["shape_bigtxn_relay"]["peak_rss_mb"] = 140.0
    assert report.big_txn_key(res) == "shape_bigtxn_relay"
    row = by_key(report.rows(res, QUICK), "shape_bigtxn_relay")[0]
    assert row["name"] == "cdc-relay drain: one txn of 100k rows"
    assert row["text"].endswith(", median of 2")
    t = target(report.targets(res, QUICK), RSS)
    assert t["measured"] == "140 MB max over drains up to N=1M"
    assert t["met"] is True
    assert report.big_txn_key(healthy()) == "cdc_big_txn"


def test_shape_rows_show_what_each_message_shape_costs_the_broker() -> None:
    rows = report.shape_rows(shape_results(), QUICK)
    row = shape_row(rows, "shape_txn1")
    assert row["broker_cpu_us_per_event"] == {"same": 90.0, "minimal": 70.0, "relay": 95.0}
    text = report.shapes_table(rows, QUICK)
    assert "    broker CPU µs/ev: under the relay 95.0, same shape 90.0, minimal 70.0" in text
    # a result from before the broker was measured prints a dash, not a zero
    old = shape_results()
    for k in ("shape_txn1_same", "shape_txn1_minimal", "shape_txn1_relay"):
        for sample in old[k]["samples"]:
            del sample["broker_cpu_us_per_event"]
    text = report.shapes_table(report.shape_rows(old, QUICK), QUICK)
    assert "    broker CPU µs/ev: under the relay –, same shape –, minimal –" in text


# -- recovery: backfill against the streaming drain of the same rows ----------------------------
BACKFILL = "backfill >= 0.8 x the streaming drain of the same rows"


def test_backfill_targets_from_the_medians_with_rounds_beside() -> None:
    results = {
        "recovery_stream": _combine([drain(rate=10_000.0), drain(rate=12_000.0)]),
        "recovery_backfill": _combine(
            [drain(rate=9_000.0, rss=60.0), drain(rate=9_600.0, rss=62.0)]
        ),
    }
    results["recovery_backfill"]["peak_rss_mb"] = 62.0
    out = report.recovery_targets(results)
    speed = target(out, BACKFILL)
    assert speed["met"] is True
    assert speed["measured"].startswith("0.85x (9,300 vs 11,000 ev/s")
    assert "per round 0.90x, 0.80x" in speed["measured"]
    rss = target(out, "backfill peak RSS <= 150 MB")
    assert rss["met"] is True and rss["measured"] == "62 MB (stream 45 MB)"


def test_a_slow_or_fat_backfill_is_not_met_and_a_failed_one_is_na() -> None:
    slow = report.recovery_targets(
        {
            "recovery_stream": drain(rate=10_000.0),
            "recovery_backfill": drain(rate=7_000.0, rss=151.0),
        }
    )
    assert target(slow, BACKFILL)["met"] is False
    assert target(slow, "backfill peak RSS <= 150 MB")["met"] is False
    failed = report.recovery_targets({"recovery_stream": drain(), "recovery_backfill": error()})
    assert [t["met"] for t in failed] == [None]
    assert "RuntimeError: boom" in failed[0]["measured"]


def test_tls_is_reported_as_a_ratio_without_a_target() -> None:
    results = {
        "tls_plain": _combine([drain(rate=10_000.0), drain(rate=12_000.0)]),
        "tls_tls": _combine([drain(rate=9_000.0, cpu=40.0), drain(rate=10_000.0, cpu=40.0)]),
    }
    (line,) = report.tls_summary(results)
    assert line["met"] is None
    assert line["measured"].startswith("0.86x (9,500 vs 11,000 ev/s")
    assert "per round 0.90x, 0.83x" in line["measured"]
    (failed,) = report.tls_summary({"tls_plain": drain(), "tls_tls": error()})
    assert failed["met"] is None and "boom" in failed["measured"]


def test_scale_is_reported_as_a_ratio_with_what_each_side_spent() -> None:
    """Cluster vs one node: the ratio of the medians, per round beside it, and each side's
    relay, broker and walsender CPU per event turned into cores at its rate."""

    def spent(rate: float, broker: float, nodes: dict[str, float] | None = None) -> Result:
        r = drain(rate=rate, cpu=30.0)
        r.update(broker_cpu_us_per_event=broker, walsender_cpu_us_per_event=20.0)
        if nodes is not None:
            r["node_cpu_us_per_event"] = nodes
        return r

    results = {
        "single_classic": _combine([spent(10_000.0, 60.0), spent(12_000.0, 60.0)]),
        "cluster_quorum": _combine(
            [
                spent(5_000.0, 150.0, {"a": 90.0, "b": 30.0, "c": 30.0}),
                spent(6_000.0, 150.0, {"a": 90.0, "b": 30.0, "c": 30.0}),
            ]
        ),
    }
    (line,) = report.scale_summary(results)
    assert line["met"] is None
    assert line["measured"].startswith("0.50x (5,500 vs 11,000 ev/s")
    assert "per round 0.50x, 0.50x" in line["measured"]
    # 30 + 150 + 20 µs/event at 5,500 ev/s; 30 + 60 + 20 at 11,000
    assert "broker 150.0, walsender 20.0 µs/event = 1.10 cores" in line["measured"]
    assert "(broker per node 90, 30, 30)" in line["measured"]
    one = "one node: relay 30.0, broker 60.0, walsender 20.0 µs/event = 1.21 cores"
    assert one in line["measured"]
    (failed,) = report.scale_summary({"single_classic": drain(), "cluster_quorum": error()})
    assert failed["met"] is None and "boom" in failed["measured"]


# -- consumer: the kit against a bare pika consumer --------------------------------------------
KIT_DRAIN = (
    "kit drain (no-op handler) >= 0.7 x a bare pika consumer (manual acks, prefetch 100) "
    "on the same backlog"
)
WRITER = "the writer reached its rate (>= 98% of it in every round)"


def consumer_drain(rate: float, cpu: float, backend: float | None = None) -> Result:
    """The shape of ConsumerBench._bare_drain / _kit_drain (the kit's with ``backend``)."""
    r: Result = {
        "n": N,
        "delivered": N,
        "seconds": N / rate,
        "rate": rate,
        "cpu_us_per_event": cpu,
        "prefetch": 100,
        "queue_left": 0,
    }
    if backend is not None:
        r.update(inbox_backend_cpu_us_per_event=backend, outcomes={"applied": N})
    return r


def consumer_steady(
    p50: float, p99: float, *, offered: float = 2000.0, achieved: float = 2000.0, cpu: float = 90.0
) -> Result:
    """The shape of ConsumerBench.steady: ages in ms as latency_summary gives them."""
    ages = report.latency_summary([p50 / 1000] * 98 + [p99 / 1000] * 2)
    return {
        "offered_rate": offered,
        "achieved_rate": achieved,
        "producer_worst_lag_s": 0.004,
        "committed": 100,
        "received": 100,
        "age_ms": ages,
        "cpu_us_per_event": cpu,
    }


def consumer_results(kit_rates: tuple[float, float] = (2_400.0, 2_600.0)) -> dict[str, Result]:
    return {
        "consumer_fill": _combine([drain(rate=7_000.0), drain(rate=7_400.0)]),
        "consumer_bare": _combine([consumer_drain(3_000.0, 90.0), consumer_drain(3_400.0, 94.0)]),
        "consumer_kit": _combine([consumer_drain(r, 300.0, 150.0) for r in kit_rates]),
        "consumer_steady_bare": _combine_ages(
            [consumer_steady(2.0, 5.0), consumer_steady(3.0, 7.0)]
        ),
        "consumer_steady_kit": _combine_ages(
            [consumer_steady(4.0, 9.0, cpu=400.0), consumer_steady(6.0, 13.0, cpu=420.0)]
        ),
        "consumer_light_bare": _combine_ages(
            [consumer_steady(1.0, 3.0, offered=500.0, achieved=500.0)]
        ),
        "consumer_light_kit": _combine_ages(
            [consumer_steady(2.0, 4.0, offered=500.0, achieved=499.0)]
        ),
    }


def test_kit_drain_ratio_from_the_medians_with_rounds_and_cpu() -> None:
    out = report.consumer_summary(consumer_results(), QUICK)
    drain_line = target(out, KIT_DRAIN)
    assert drain_line["met"] is True
    measured = drain_line["measured"]
    assert measured.startswith("0.78x (2,500 vs 3,200 ev/s at N=20,000, medians of 2 rounds")
    assert "per round 0.80x, 0.76x" in measured
    assert "consumer CPU µs/event kit 300.0 vs bare 92.0, plus 150.0" in measured
    assert "the relay filled both queues at 7,200 ev/s" in measured


def test_kit_drain_below_the_target_is_not_met_and_a_failed_side_is_na() -> None:
    slow = report.consumer_summary(consumer_results((700.0, 800.0)), QUICK)
    assert target(slow, KIT_DRAIN)["met"] is False
    res = consumer_results()
    res["consumer_kit"] = _combine([error(), error()])
    failed = report.consumer_summary(res, QUICK)
    line = next(t for t in failed if t["target"].startswith("kit drain"))
    assert line["met"] is None and "boom" in line["measured"]


def test_ages_side_by_side_with_medians_and_what_the_kit_adds() -> None:
    out = report.consumer_summary(consumer_results(), QUICK)
    steady, light = (t for t in out if t["target"].startswith("age at"))
    assert steady["target"].startswith("age at steady 2,000 ev/s")
    assert light["target"].startswith("age at light 500 ev/s")
    assert steady["met"] is None
    m = steady["measured"]
    assert m.startswith("kit vs bare: p50 5.0 vs 2.5 ms, p99 11.0 vs 6.0 ms")
    assert "the kit adds +2.5 ms at p50, +5.0 ms at p99" in m
    assert "p99 kit/bare per round 9.0/5.0, 13.0/7.0 ms" in m
    assert "consumer CPU µs/event kit 410.0 vs bare 90.0" in m
    assert "NOTE" not in m  # the kit drains faster than it is offered


def test_ages_say_when_the_kit_cannot_keep_up_with_the_offered_rate() -> None:
    out = report.consumer_summary(consumer_results((700.0, 900.0)), QUICK)
    steady, light = (t for t in out if t["target"].startswith("age at"))
    assert "NOTE the kit drains at 800 ev/s, below the 2,000 offered" in steady["measured"]
    assert "NOTE" not in light["measured"]


def test_ages_na_when_a_side_failed() -> None:
    res = consumer_results()
    res["consumer_steady_bare"] = error()
    out = report.consumer_summary(res, QUICK)
    steady = next(t for t in out if t["target"].startswith("age at steady"))
    assert steady["met"] is None and steady["measured"] == "n/a (RuntimeError: boom)"


@pytest.mark.parametrize(("achieved", "met"), [(1_960.0, True), (1_950.0, False)])
def test_writer_rate_checked_in_every_round(achieved: float, met: bool) -> None:
    res = consumer_results()
    res["consumer_steady_kit"] = _combine_ages(
        [consumer_steady(4.0, 9.0), consumer_steady(4.0, 9.0, achieved=achieved)]
    )
    line = target(report.consumer_summary(res, QUICK), WRITER)
    assert line["met"] is met
    assert f"2,000 ev/s offered: 2,000, {achieved:,.0f}, 2,000, 2,000 achieved" in line["measured"]
    assert "500 ev/s offered: 499, 500 achieved, at worst 4 ms behind" in line["measured"]


def test_writer_rate_na_without_steady_rounds() -> None:
    line = target(report.consumer_summary({}, QUICK), WRITER)
    assert line["met"] is None


def test_combine_ages_takes_each_percentile_median_and_keeps_rounds() -> None:
    rounds = [consumer_steady(2.0, 5.0), error(), consumer_steady(4.0, 9.0, achieved=1_990.0)]
    combined = _combine_ages(rounds)
    assert combined["age_ms"]["p50"] == 3.0 and combined["age_ms"]["p99"] == 7.0
    assert combined["age_ms"]["n"] == 200
    assert combined["achieved_rate"] == 1_995.0
    assert combined["failed_rounds"] == 1 and combined["samples"] == rounds


def test_combine_rounds_routes_age_rounds_to_combine_ages() -> None:
    res = {"consumer_steady_kit#1": consumer_steady(2.0, 5.0), "consumer_steady_kit#2": error()}
    _combine_rounds(res)
    assert res["consumer_steady_kit"]["age_ms"]["p99"] == 5.0


def test_age_timeline_worst_age_per_second_of_commit_time() -> None:
    commits = [100.0, 100.5, 101.2, 103.9]
    ages = [0.002, 0.004, 0.400, 0.003]
    assert report.age_timeline(commits, ages) == [[0, 2, 4.0], [1, 1, 400.0], [3, 1, 3.0]]
    assert report.age_timeline([], []) == []


def test_consumer_anomalies() -> None:
    kit = consumer_drain(800.0, 700.0, 400.0)
    kit.update(
        queue_left=3,
        outcomes={"applied": N - 1, "skipped": 1},
        consumer_log_problems=[
            "t warning consumer behind: event applied later than threshold after its commit",
            "t error handler failed; message dead-lettered: KeyError",
        ],
    )
    found = report.anomalies({"consumer_kit": kit})
    assert found == [
        "consumer_kit: 3 messages left in the queue at the end",
        "consumer_kit: the kit's inbox recorded 1 as skipped",
        "consumer_kit: consumer log: t error handler failed; message dead-lettered: KeyError",
    ]
