"""MAC counts: every closed form against hand formulas and against a counted run.

The counted run swaps fsdeploy.heads.ops.mm / rowdot for versions that add up m*k*n and n*d from the
shapes they are actually called with (test_heads_contract checks no product bypasses ops).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_heads_contract import HEAD_CASES, build_transform, head_params, make_task, transform_params

from fsdeploy.heads import TaskModel, make_head, ops

SHAPES = [(20, 12, 4), (9, 24, 3)]  # (N, D, K): N > D + 1 and N < D + 1 (the Newton head's two regimes)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    total = {"macs": 0}
    real_mm, real_rowdot = ops.mm, ops.rowdot

    def mm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        assert a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]
        total["macs"] += a.shape[0] * a.shape[1] * b.shape[1]
        return real_mm(a, b, out=out)

    def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        assert a.ndim == 2 and a.shape == b.shape
        total["macs"] += a.size
        return real_rowdot(a, b)

    monkeypatch.setattr(ops, "mm", mm)
    monkeypatch.setattr(ops, "rowdot", rowdot)
    return total


def hand_fit_macs(name: str, head, n: int, d: int, k: int) -> int:
    """The counts written out from each method's description, independent of the heads' own formulas."""
    if name == "ncc":
        return k * n * d + k * d  # class means, then |p|^2 or |p|
    if name == "linear":
        return head.iters * 2 * min(n, head.batch) * (d + 1) * k
    if name == "baseline":
        return head.epochs * 2 * n * (d + 1) * k
    if name == "baseline++":
        steps = head.epochs * math.ceil(n / head.batch)
        return n * d + head.epochs * 2 * n * d * k + steps * 2 * k * d + 2 * k * d  # g = |v| at init and end
    if name == "lt-ncc":
        step = 2 * n * d * d + 4 * n * k * d + 2 * (n + k) * d
        return head.steps * step + n * d * d + k * n * d + k * d
    if name == "linear-newton":
        cg = n * n * k + 3 * n * k
        newton = n * n * k + n * k + head.cg_steps * cg + 3 * n * k
        return (d * n if head.standardise else 0) + n * n * d + head.steps * newton + k * n * d
    if name == "bd-cspn":  # class means, |p|, support norms, cos to own mean, weighted class sums
        return k * n * d + k * d + n * d + n * d + k * n * d
    raise AssertionError(f"no hand formula for {name}")


def hand_predict_macs(name: str, head, m: int, d: int, k: int) -> int:
    if name in ("linear", "baseline", "linear-newton"):
        return m * d * k
    if name == "ncc":
        return m * d * k + (m * d if head.distance == "cosine" else 0)
    if name == "baseline++":
        return m * d + m * d * k
    if name == "lt-ncc":
        return m * d * d + m * d + m * d * k
    if name == "bd-cspn":  # query norms, cos to means, pseudo-labelled sums, |p'|, final cos
        return m * d + m * d * k + k * m * d + k * d + m * d * k
    raise AssertionError(f"no hand formula for {name}")


def test_every_head_has_a_hand_formula() -> None:
    for name in HEAD_CASES:
        head = make_head(name)
        assert hand_fit_macs(name, head, 5, 4, 2) > 0 and hand_predict_macs(name, head, 3, 4, 2) > 0


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("name,opts", head_params())
def test_head_macs_match_hand_formula_and_counted_run(name, opts, n, d, k, counted) -> None:
    xs, ys, xq, _ = make_task(k=k, shots=1, dim=d)
    xs = np.concatenate([xs, make_task(seed=9, k=k, shots=n, dim=d)[0]])[:n]
    ys = np.arange(n, dtype=np.int64) % k
    head = make_head(name, **opts)
    assert head.fit_macs(n, d, k) == hand_fit_macs(name, head, n, d, k)
    assert head.predict_macs(7, d, k) == hand_predict_macs(name, head, 7, d, k)
    counted["macs"] = 0
    head.fit(xs, ys, rng=np.random.default_rng(0))
    assert counted["macs"] == head.fit_macs(n, d, k)
    counted["macs"] = 0
    head.predict_proba(xq[:7])
    assert counted["macs"] == head.predict_macs(7, d, k)


@pytest.mark.parametrize("name,opts", transform_params())
def test_transform_macs_match_counted_run(name, opts, counted) -> None:
    xs, _, xq, _ = make_task()
    tr = build_transform(name, opts, xs.shape[1])
    counted["macs"] = 0
    tr.fit(xs)
    assert counted["macs"] == tr.fit_macs(*xs.shape) == 0
    tr.apply(xq)
    normalises = name in ("l2", "cl2n", "cl2n-support") or (name == "ci" and opts.get("normalise", True))
    expected = xq.size if normalises else 0  # one squared norm per row
    assert counted["macs"] == tr.macs(*xq.shape) == expected


def test_task_model_macs_add_up(counted) -> None:
    xs, ys, xq, _ = make_task()
    n, d = xs.shape
    model = TaskModel.create("ncc", "cl2n-support", distance="cosine")
    counted["macs"] = 0
    model.fit(xs, ys)
    assert counted["macs"] == model.fit_macs(n, d, 4) == n * d + (4 * n * d + 4 * d)
    counted["macs"] = 0
    model.predict_proba(xq)
    m = xq.shape[0]
    assert counted["macs"] == model.predict_macs(m, d, 4) == m * d + (m * d * 4 + m * d)
    assert model.n_params(d, 4) == d + 4 * d  # support mean + prototypes


@pytest.mark.parametrize("n,d,k", [(25, 1280, 5), (100, 1280, 10), (50, 384, 5)])
def test_newton_head_needs_ten_times_fewer_fit_macs(n: int, d: int, k: int) -> None:
    """Issue #8, target 5: the Newton head's fit costs at most a tenth of the 500-step Adam head's."""
    adam, newton = make_head("linear"), make_head("linear-newton")
    assert 10 * newton.fit_macs(n, d, k) <= adam.fit_macs(n, d, k)
    assert newton.predict_macs(1, d, k) == adam.predict_macs(1, d, k)
