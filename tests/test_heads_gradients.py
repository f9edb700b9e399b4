"""Finite-difference checks (float64) of every hand-written gradient the iterative heads train with."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fsdeploy.heads.baseline import cosine_loss_grad, normalise_features
from fsdeploy.heads.linear import augment, linear_loss_grad
from fsdeploy.heads.ltncc import ltncc_loss_grad
from fsdeploy.heads.newton import objective


def central_differences(loss: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d loss / d x by central differences, every coordinate."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = loss(x)
        flat[i] = keep - h
        down = loss(x)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * h)
    return grad


def assert_close_gradient(analytic: np.ndarray, numeric: np.ndarray) -> None:
    scale = max(np.abs(numeric).max(), 1e-8)
    assert np.abs(analytic - numeric).max() / scale < 1e-6, (analytic, numeric)


def sample(seed: int, n: int = 9, d: int = 5, k: int = 3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    return rng, rng.standard_normal((n, d)), labels.astype(np.int64)


@pytest.mark.parametrize("weighting", ["batch mean (baseline)", "draw counts (UpperCaSE)"])
def test_linear_cross_entropy_gradient(weighting: str) -> None:
    rng, x, labels = sample(0)
    xa = augment(x)
    theta = rng.standard_normal((3, xa.shape[1]))
    if weighting.startswith("batch"):
        weights = np.full(x.shape[0], 1.0 / x.shape[0])
    else:
        counts = np.bincount(rng.integers(0, x.shape[0], 16), minlength=x.shape[0])
        weights = counts / 16.0
    loss, grad = linear_loss_grad(theta, xa, labels, weights)
    assert grad.dtype == np.float64
    assert_close_gradient(grad, central_differences(lambda t: linear_loss_grad(t, xa, labels, weights)[0], theta))
    # the loss itself against a direct formula
    logits = xa @ theta.T
    direct = np.sum(weights * (np.log(np.exp(logits).sum(1)) - logits[np.arange(x.shape[0]), labels]))
    assert abs(loss - direct) < 1e-12


@pytest.mark.parametrize("scale", [2.0, 10.0])
def test_baseline_plus_plus_gradient(scale: float) -> None:
    rng, x, labels = sample(1)
    xn = normalise_features(x)
    v, g = rng.standard_normal((3, x.shape[1])), 0.5 + rng.random(3)
    _, dv, dg = cosine_loss_grad(v, g, xn, labels, scale)
    assert_close_gradient(dv, central_differences(lambda vv: cosine_loss_grad(vv, g, xn, labels, scale)[0], v.copy()))
    assert_close_gradient(dg, central_differences(lambda gg: cosine_loss_grad(v, gg, xn, labels, scale)[0], g.copy()))
    # features are divided by |x| + 1e-5, as in the reference code
    np.testing.assert_allclose(xn, x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5))


@pytest.mark.parametrize("start", ["identity", "random"])
def test_lt_ncc_gradient(start: str) -> None:
    rng, x, labels = sample(2, n=8, d=4, k=3)
    beta = np.eye(4) if start == "identity" else np.eye(4) + 0.3 * rng.standard_normal((4, 4))
    _, grad = ltncc_loss_grad(beta, x, labels, 3, 10.0)
    assert_close_gradient(grad, central_differences(lambda b: ltncc_loss_grad(b, x, labels, 3, 10.0)[0], beta.copy()))


def test_newton_objective_matches_direct_formula() -> None:
    rng, x, labels = sample(3)
    logits = rng.standard_normal((2, x.shape[0], 3))
    penalty = np.array([0.7, 2.0])
    got = objective(logits, labels, penalty, 0.1)
    for i in range(2):
        z = logits[i]
        ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(z.shape[0]), labels])
        assert abs(got[i] - (ce + 0.05 * penalty[i])) < 1e-12
