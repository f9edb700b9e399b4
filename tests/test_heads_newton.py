"""The Newton head reaches the optimum of its objective (checked against torch L-BFGS in float64) and
classifies as well as the 500-step Adam head with a fraction of its MACs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsdeploy.heads import make_head


def noisy_task(seed: int, k: int, shots: int, d: int, queries: int = 40, separation: float = 0.15,
               anisotropic: bool = False):
    """Separable-but-noisy classes: means separation * N(0, I), unit noise (or noise scales 0.25..1.75
    cycling over the dimensions when `anisotropic`)."""
    rng = np.random.default_rng(seed)
    means = separation * rng.standard_normal((k, d))
    noise = (1 + np.arange(d) % 7) / 4 if anisotropic else np.ones(d)
    ys, yq = np.repeat(np.arange(k), shots), np.repeat(np.arange(k), queries)
    xs = means[ys] + noise * rng.standard_normal((ys.size, d))
    xq = means[yq] + noise * rng.standard_normal((yq.size, d))
    return xs.astype(np.float32), ys.astype(np.int64), xq.astype(np.float32), yq


def torch_optimum(xs: np.ndarray, ys: np.ndarray, k: int, l2: float, scale: np.ndarray | None = None) -> np.ndarray:
    """argmin_W mean CE([x, c] W^T) + lam/2 |W|^2, lam = l2 * mean |[x, c]|^2, c^2 = mean |x|^2, by L-BFGS
    in float64; returns [weights | bias] in the original feature units."""
    x = torch.from_numpy(xs.astype(np.float64))
    if scale is not None:
        x = x / torch.from_numpy(scale)
    c = (x * x).sum(1).mean().sqrt()
    xa = torch.cat([x, torch.full((x.shape[0], 1), float(c), dtype=torch.float64)], dim=1)
    lam = l2 * (xa * xa).sum(1).mean()
    y = torch.from_numpy(ys)
    w = torch.zeros(k, xa.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xa @ w.T, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = w.detach().numpy().copy()
    out[:, -1] *= float(c)
    if scale is not None:
        out[:, :-1] /= scale
    return out


@pytest.mark.parametrize(
    "n_per_class,d,k,opts",
    [(5, 64, 4, {}), (20, 10, 3, {}), (5, 64, 4, {"l2": 1e-4, "steps": 10, "cg_steps": 16}),
     (6, 32, 5, {"standardise": False}), (20, 10, 3, {"standardise": False})],
    ids=["N<D", "N>D", "weak-l2", "raw-N<D", "raw-N>D"],
)
def test_newton_reaches_the_optimum(n_per_class: int, d: int, k: int, opts: dict) -> None:
    xs, ys, xq, _ = noisy_task(0, k, n_per_class, d)
    xs[:, 0] *= 20.0  # one dominant feature: an ill-conditioned Gram matrix
    xq[:, 0] *= 20.0
    head = make_head("linear-newton", **opts).fit(xs, ys)
    scale = None
    if head.standardise:
        var = xs.astype(np.float64).var(axis=0)
        scale = np.sqrt(var + 1e-3 * var.mean())
    ref = torch_optimum(xs, ys, k, head.l2, scale)
    theta = np.concatenate([head.weight_, head.bias_[:, None]], axis=1)
    np.testing.assert_allclose(theta, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    logits = xq @ ref[:, :-1].T + ref[:, -1]
    np.testing.assert_array_equal(head.predict(xq), logits.argmax(1))


def test_newton_predictions_do_not_depend_on_feature_scale() -> None:
    xs, ys, xq, _ = noisy_task(1, 4, 5, 32)
    probs = make_head("linear-newton").fit(xs, ys).predict_proba(xq)
    np.testing.assert_allclose(make_head("linear-newton").fit(50 * xs, ys).predict_proba(50 * xq), probs, atol=1e-4)


@pytest.mark.parametrize("anisotropic", [False, True], ids=["isotropic", "anisotropic"])
def test_newton_accuracy_matches_the_adam_head(anisotropic: bool) -> None:
    """Mean query accuracy over a few noisy 5-way 5-shot tasks: Newton within 2 points of Adam (or better)."""
    acc = {"linear": [], "linear-newton": []}
    for seed in range(6):
        xs, ys, xq, yq = noisy_task(seed, 5, 5, 256, separation=0.25, anisotropic=anisotropic)
        for name in acc:
            pred = make_head(name).fit(xs, ys, rng=np.random.default_rng(seed)).predict(xq)
            acc[name].append(np.mean(pred == yq))
    adam, newton = np.mean(acc["linear"]), np.mean(acc["linear-newton"])
    assert 0.5 < adam < 0.95  # the tasks are learnable but not trivial
    assert newton >= adam - 0.02, acc
