"""Wall-clock speed of the linear head against a plain PyTorch loop of the same recipe (issue #8).

Opt-in (`-m slow`): timings on a shared CI box are noisy. Both sides run on one CPU thread, interleaved,
and the best of several runs is compared; they must also agree on the weights.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fsdeploy.bench.reference import torch_linear_head
from fsdeploy.heads import make_head
from fsdeploy.heads.linear import draw_batches


def torch_loop(xs, ys, k, batches, lrs):
    return torch_linear_head(xs, ys, k, batches, lrs)


@pytest.mark.slow
@pytest.mark.parametrize("n,d,k,min_speedup", [(25, 1280, 5, 8.0), (100, 1280, 10, 3.0)])
def test_linear_head_beats_a_torch_loop(n: int, d: int, k: int, min_speedup: float) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    xs = np.maximum(rng.standard_normal((n, d)) + 0.5, 0).astype(np.float32)
    ys = (np.arange(n) % k).astype(np.int64)
    head = make_head("linear")
    batches, lrs = draw_batches(np.random.default_rng(1), n), head.learning_rates()
    ours, theirs = [], []
    for _ in range(5):
        t = time.perf_counter()
        head.fit(xs, ys, rng=np.random.default_rng(1))
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        lin = torch_loop(xs, ys, k, batches, lrs)
        theirs.append(time.perf_counter() - t)
    np.testing.assert_allclose(head.weight_, lin.weight.detach().numpy(), atol=1e-5)
    speedup = min(theirs) / min(ours)
    print(f"N={n} D={d} K={k}: numpy {min(ours) * 1e3:.1f} ms, torch {min(theirs) * 1e3:.1f} ms, {speedup:.1f}x")
    assert speedup >= min_speedup
