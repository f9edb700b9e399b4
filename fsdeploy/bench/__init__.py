"""Benchmarks: count MACs (macs.py), cost each adaptation method (costs.py) from counts on a bundle's own
modules (cost_inputs.py), time engines (latency.py, measure.py), measure accuracy (accuracy.py,
finetune_accuracy.py, stats.py), compare with plain PyTorch (reference.py, perf_measures.py, perf.py:
issue #8's targets) and render tables, CSV/JSON and plots (render.py). methods.py names each method once
across them; workspace.py makes the bundles, images and corpora a benchmark needs, once.

Modules that import torch are not imported here: `import fsdeploy.bench` stays light.
"""
from __future__ import annotations

from fsdeploy.bench.latency import LatencyStats, compare, latency_rows, time_callable
from fsdeploy.bench.stats import accuracy_row, mean_ci95

__all__ = ["LatencyStats", "accuracy_row", "compare", "latency_rows", "mean_ci95", "time_callable"]
