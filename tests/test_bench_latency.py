"""Latency statistics on a fake clock with known durations (no real timing is asserted)."""
from __future__ import annotations

import math
import statistics

import pytest

from fsdeploy.bench.latency import UNSTABLE_CV, LatencyStats, compare, latency_rows, time_callable
from fsdeploy.errors import InvalidInput


class FakeRunner:
    """Each call advances a fake clock by the next duration (seconds); the clock only moves inside calls."""

    def __init__(self, durations_s: list[float]) -> None:
        self.durations = list(durations_s)
        self.now = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.now += self.durations[self.calls % len(self.durations)]
        self.calls += 1


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics at rank q/100 * (n - 1)."""
    rank = q / 100 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def test_fixed_iterations_skip_warmup_and_give_exact_statistics() -> None:
    warm = [0.5] * 3  # slow first calls must not be timed
    timed = [0.001 * (1 + (7 * i) % 20) for i in range(20)]  # 1..20 ms in a shuffled order
    runner = FakeRunner(warm + timed)
    stats = time_callable(runner, warmup=3, iters=20, batch=4, clock=runner.clock)
    expected_ms = sorted(d * 1000 for d in timed)
    assert runner.calls == 23 and stats.n == 20 and stats.batch == 4
    assert stats.samples_ms == pytest.approx([d * 1000 for d in timed])
    assert stats.mean == pytest.approx(statistics.fmean(expected_ms))
    assert stats.std == pytest.approx(statistics.pstdev(expected_ms))
    for q, value in [(50, stats.median), (90, stats.p90), (95, stats.p95), (99, stats.p99)]:
        assert value == pytest.approx(_percentile(expected_ms, q))
    assert stats.median == pytest.approx(10.5) and stats.p90 == pytest.approx(18.1)
    assert stats.throughput == pytest.approx(4 * 1000 / statistics.fmean(expected_ms))


def test_time_budget_stops_once_spent() -> None:
    runner = FakeRunner([0.25])
    stats = time_callable(runner, warmup=2, budget_s=1.0, clock=runner.clock)
    assert stats.n == 4 and runner.calls == 6
    capped = time_callable(FakeRunner([0.25]), warmup=0, iters=2, budget_s=10.0, clock=FakeRunner([0.25]).clock)
    assert capped.n == 2


def test_default_is_one_hundred_calls_and_bad_arguments_are_refused() -> None:
    runner = FakeRunner([0.001])
    assert time_callable(runner, warmup=0, clock=runner.clock).n == 100
    with pytest.raises(InvalidInput, match="iters >= 1"):
        time_callable(runner, iters=0)
    with pytest.raises(InvalidInput, match="at least one timed sample"):
        LatencyStats((), 1)


def test_unstable_flag_and_warning() -> None:
    steady = LatencyStats((10.0, 10.1, 9.9, 10.0) * 25)
    assert not steady.unstable and steady.warning == ""
    spiky = LatencyStats((10.0,) * 95 + (60.0,) * 5)  # tail 6x the median
    assert spiky.unstable and "p99/median" in spiky.warning
    spread = LatencyStats((5.0, 15.0) * 50)  # cv 0.5
    assert spread.cv > UNSTABLE_CV and spread.unstable


def test_compare_reports_how_many_times_faster_b_is() -> None:
    slow = LatencyStats((4.0, 6.0, 5.0, 5.0), batch=8)
    fast = LatencyStats((2.0, 3.0, 2.5, 2.5), batch=8)
    rows = {r["stat"]: r for r in compare(slow, fast, names=("torch", "ort"))}
    assert rows["mean_ms"]["speedup"] == pytest.approx(2.0)
    assert rows["median_ms"]["torch"] == pytest.approx(5.0) and rows["median_ms"]["ort"] == pytest.approx(2.5)
    assert rows["throughput_ips"]["speedup"] == pytest.approx(2.0)
    assert rows["throughput_ips"]["ort"] == pytest.approx(8 * 1000 / 2.5)


def test_latency_rows_carry_summary_and_warning() -> None:
    (row,) = latency_rows([("ort b1", LatencyStats((1.0, 3.0), batch=1))])
    assert row["name"] == "ort b1" and row["mean_ms"] == pytest.approx(2.0) and row["iters"] == 2
    assert row["unstable"] is True and row["warning"].startswith("unstable timing")
