"""The benchmark report: percentiles, the table's rows and ratios, target verdicts, anomalies.

Every result here is a small synthetic dict with the shape the harness's ``Bench`` methods
return (``_combine`` itself builds the multi-round headline drains), so the verdicts are checked
against known numbers without running a benchmark.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import report
from benchmarks.run import Plan, _combine

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
