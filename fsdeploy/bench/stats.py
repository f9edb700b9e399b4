"""Accuracy summaries for episodic benchmarks: mean and 95% confidence interval over episodes.

The few-shot literature (e.g. Snell et al. 2017; Meta-Dataset, Triantafillou et al. 2020; UpperCaSE,
Patacchiola et al. 2022) reports mean accuracy over episodes +- 1.96 std / sqrt(n), the normal
approximation of the 95% interval of the mean; fsdeploy does the same, with the sample std (ddof=1).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fsdeploy.errors import InvalidInput

Z95 = 1.96


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 * std(ddof=1) / sqrt(n) of `values`.

    Returns:
        (mean, half_width); half_width is nan for a single value (no spread to estimate).
    Raises:
        InvalidInput: no values, or a non-finite value.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise InvalidInput("mean_ci95 needs at least one value (e.g. one accuracy per episode)")
    if not np.all(np.isfinite(arr)):
        raise InvalidInput("mean_ci95 got a nan or inf value; check the per-episode accuracies")
    if arr.size == 1:
        return float(arr[0]), math.nan
    return float(arr.mean()), float(Z95 * arr.std(ddof=1) / math.sqrt(arr.size))


def accuracy_row(method: str, episode_accuracies: Sequence[float], **extra: Any) -> dict[str, Any]:
    """Row {method, accuracy, ci95, episodes, ...extra} in percent from per-episode accuracies in [0, 1]."""
    mean, half = mean_ci95(episode_accuracies)
    return {"method": method, "accuracy": 100.0 * mean, "ci95": 100.0 * half,
            "episodes": len(episode_accuracies), **extra}
