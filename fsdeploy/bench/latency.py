"""Latency statistics: time a callable with warm-up, summarise like trtexec, compare two runs as ratios.

Shared machines are noisy, so comparisons are reported as ratios measured in one process, and a run
whose spread is too wide is flagged `unstable` rather than trusted.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsdeploy.errors import InvalidInput

# A run is unstable when its coefficient of variation (std / mean) exceeds UNSTABLE_CV or its tail
# (p99 / median) exceeds UNSTABLE_TAIL: the mean then says little about a typical call.
UNSTABLE_CV = 0.15
UNSTABLE_TAIL = 2.0

STATS = ("mean", "median", "p90", "p95", "p99", "std", "min", "max")


@dataclass(frozen=True)
class LatencyStats:
    """Per-call wall times in milliseconds of `batch` images each.

    Percentiles use linear interpolation between order statistics (numpy's default), std is the
    population std (ddof=0) of the samples.
    """

    samples_ms: tuple[float, ...]
    batch: int = 1

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise InvalidInput("LatencyStats needs at least one timed sample; raise iters or budget_s")
        if self.batch < 1:
            raise InvalidInput(f"batch must be >= 1, got {self.batch}")

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.samples_ms, dtype=np.float64), q))

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def median(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def std(self) -> float:
        return float(np.std(self.samples_ms))

    @property
    def min(self) -> float:
        return float(np.min(self.samples_ms))

    @property
    def max(self) -> float:
        return float(np.max(self.samples_ms))

    @property
    def throughput(self) -> float:
        """Images per second at the mean latency."""
        return self.batch * 1000.0 / self.mean if self.mean > 0 else math.inf

    @property
    def cv(self) -> float:
        """Coefficient of variation, std / mean."""
        return self.std / self.mean if self.mean > 0 else 0.0

    @property
    def unstable(self) -> bool:
        return self.cv > UNSTABLE_CV or (self.median > 0 and self.p99 / self.median > UNSTABLE_TAIL)

    @property
    def warning(self) -> str:
        """Why the timing should not be trusted, or '' when it looks stable."""
        if not self.unstable:
            return ""
        return (
            f"unstable timing: std/mean {self.cv:.2f} (limit {UNSTABLE_CV}), p99/median "
            f"{self.p99 / self.median if self.median > 0 else math.inf:.2f} (limit {UNSTABLE_TAIL}); "
            "close other work, raise warm-up or iterations, or compare ratios from one run"
        )

    def summary(self) -> dict[str, Any]:
        """Plain dict of every statistic, for tables and CSV/JSON."""
        out: dict[str, Any] = {"batch": self.batch, "iters": self.n}
        out.update({f"{s}_ms": getattr(self, s) for s in STATS})
        out["throughput_ips"] = self.throughput
        out["unstable"] = self.unstable
        return out


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 10,
    iters: int | None = None,
    budget_s: float | None = None,
    batch: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Call `fn()` `warmup` times untimed, then time each call.

    Timing stops after `iters` calls or once `budget_s` seconds of timed calls have passed, whichever
    comes first (at least one call); with neither given, 100 calls. `fn` must block until its work is
    done (synchronise the GPU inside it).

    Args:
        fn: the work to time, e.g. `lambda: engine.run(feeds)`.
        warmup: untimed calls first (allocations, graph optimisation, caches).
        iters: timed calls.
        budget_s: time budget for the timed calls, in seconds of `clock`.
        batch: images per call, for throughput.
        clock: seconds counter; injectable for tests.
    Raises:
        InvalidInput: negative warmup, iters < 1 or budget_s <= 0.
    """
    if warmup < 0 or (iters is not None and iters < 1) or (budget_s is not None and budget_s <= 0):
        raise InvalidInput(f"need warmup >= 0, iters >= 1, budget_s > 0; got {warmup}, {iters}, {budget_s}")
    if iters is None and budget_s is None:
        iters = 100
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    spent = 0.0
    while True:
        start = clock()
        fn()
        took = clock() - start
        samples.append(took * 1000.0)
        spent += took
        if iters is not None and len(samples) >= iters:
            break
        if budget_s is not None and spent >= budget_s:
            break
    return LatencyStats(tuple(samples), batch)


def compare(a: LatencyStats, b: LatencyStats, *, names: tuple[str, str] = ("a", "b")) -> list[dict[str, Any]]:
    """Rows {stat, <a>, <b>, speedup} where speedup is how many times faster b is than a (> 1: b faster).

    Time statistics give a / b; throughput gives b / a, so every row reads the same way.
    """
    rows: list[dict[str, Any]] = []
    for s in ("mean", "median", "p90", "p95", "p99"):
        va, vb = getattr(a, s), getattr(b, s)
        rows.append({"stat": f"{s}_ms", names[0]: va, names[1]: vb, "speedup": _ratio(va, vb)})
    ta, tb = a.throughput, b.throughput
    rows.append({"stat": "throughput_ips", names[0]: ta, names[1]: tb, "speedup": _ratio(tb, ta)})
    return rows


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def latency_rows(runs: Sequence[tuple[str, LatencyStats]]) -> list[dict[str, Any]]:
    """One summary row per named run, with its warning text."""
    return [{"name": name, **s.summary(), "warning": s.warning} for name, s in runs]
