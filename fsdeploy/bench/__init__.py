"""Benchmarks: count MACs (macs.py), cost each adaptation method (costs.py), time engines (latency.py),
summarise accuracy (stats.py) and render tables, CSV/JSON and plots (render.py).

macs.py and costs.py import torch, so they are not imported here: `import fsdeploy.bench` stays light.
"""
from __future__ import annotations

from fsdeploy.bench.latency import LatencyStats, compare, latency_rows, time_callable
from fsdeploy.bench.stats import accuracy_row, mean_ci95

__all__ = ["LatencyStats", "accuracy_row", "compare", "latency_rows", "mean_ci95", "time_callable"]
