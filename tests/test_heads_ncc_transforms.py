"""NCC against a direct per-query loop, and every transform against its formula written out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_heads_contract import make_task

from fsdeploy.errors import InvalidInput
from fsdeploy.heads import TaskModel, make_head, make_transform


def loop_softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    e = [math.exp(s - top) for s in scores]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("distance,scale", [("sqeuclidean", 10.0), ("cosine", 10.0), ("cosine", 4.0)])
def test_ncc_matches_direct_loop(distance: str, scale: float) -> None:
    xs, ys, xq, _ = make_task(seed=4, k=3, shots=4, dim=6, nonneg=False)
    head = make_head("ncc", distance=distance, scale=scale).fit(xs, ys)
    got = head.predict_proba(xq)
    for i, q in enumerate(xq.astype(np.float64)):
        scores = []
        for c in range(3):
            members = [x.astype(np.float64) for x, y in zip(xs, ys, strict=True) if y == c]
            proto = [sum(col) / len(members) for col in zip(*members, strict=True)]
            if distance == "sqeuclidean":
                scores.append(-sum((a - b) ** 2 for a, b in zip(q, proto, strict=True)))
            else:
                dot = sum(a * b for a, b in zip(q, proto, strict=True))
                scores.append(scale * dot / math.sqrt(sum(a * a for a in q) * sum(b * b for b in proto)))
        np.testing.assert_allclose(got[i], loop_softmax(scores), rtol=1e-4, atol=1e-6)


def test_ncc_cosine_is_scale_free_and_sqeuclidean_is_not() -> None:
    xs, ys, xq, _ = make_task(seed=5)
    cos = make_head("ncc", distance="cosine").fit(xs, ys).predict_proba(xq)
    scaled = make_head("ncc", distance="cosine").fit(3 * xs, ys).predict_proba(3 * xq)
    np.testing.assert_allclose(scaled, cos, atol=1e-6)
    sq = make_head("ncc").fit(xs, ys).predict_proba(xq)
    assert not np.allclose(make_head("ncc").fit(3 * xs, ys).predict_proba(3 * xq), sq, atol=1e-3)


def test_l2_transform() -> None:
    _, _, xq, _ = make_task()
    out = make_transform("l2").fit(xq).apply(xq)
    for row_in, row_out in zip(xq.astype(np.float64), out, strict=True):
        norm = math.sqrt(sum(v * v for v in row_in))
        np.testing.assert_allclose(row_out, [v / norm for v in row_in], rtol=1e-6)


def test_cl2n_transform_with_given_mean_and_support_mean() -> None:
    xs, _, xq, _ = make_task(nonneg=False)
    support_mean = [sum(col) / len(xs) for col in zip(*xs.astype(np.float64), strict=True)]
    base_mean = np.linspace(-1.0, 1.0, xs.shape[1], dtype=np.float32)
    for mean, tr in ((support_mean, make_transform("cl2n-support")), (base_mean, make_transform("cl2n", mean=base_mean))):
        out = tr.fit(xs).apply(xq)
        for row_in, row_out in zip(xq.astype(np.float64), out, strict=True):
            centred = [v - m for v, m in zip(row_in, mean, strict=True)]
            norm = math.sqrt(sum(c * c for c in centred))
            np.testing.assert_allclose(row_out, [c / norm for c in centred], rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInput, match="cl2n mean has size 12"):
        make_transform("cl2n", mean=base_mean).fit(xs).apply(xq[:, :4])
    with pytest.raises(InvalidInput, match="base-class mean feature and none was given.*--base-data"):
        make_transform("cl2n").fit(xs)


def official_ci(x: float, k: float) -> float:
    """Channel_Importance_FSL `simple_transform`, one value: phi of the positive part minus phi of the negative part."""
    phi = lambda z: 1.0 / math.log(1.0 / (z + 1e-5) + 1.0) ** k
    return phi(max(x, 0.0)) - phi(max(-x, 0.0))


@pytest.mark.parametrize("k", [1.3, 2.0])
def test_channel_importance_transform(k: float) -> None:
    _, _, xq, _ = make_task(nonneg=False)
    xq[0, :5] = [0.0, 1e-7, 50.0, -3.0, -1e-7]  # zero, tiny, large and negative activations
    raw = make_transform("ci", k=k, normalise=False).apply(xq)
    out = make_transform("ci", k=k).apply(xq)
    for row_in, row_raw, row_out in zip(xq.astype(np.float64), raw, out, strict=True):
        ref = [official_ci(x, k) for x in row_in]
        np.testing.assert_allclose(row_raw, ref, rtol=1e-5, atol=1e-7)
        norm = math.sqrt(sum(v * v for v in ref))
        np.testing.assert_allclose(row_out, [v / norm for v in ref], rtol=1e-5, atol=1e-7)
    assert raw[0, 0] == 0.0  # f(0) = 0: phi(0) = 0.0417 is not left in
    line = np.linspace(-10, 10, 81, dtype=np.float32)[None]
    f = make_transform("ci", normalise=False).apply(line)[0]
    np.testing.assert_allclose(f, -f[::-1], atol=1e-7)  # odd
    assert np.all(np.diff(f) > 0)  # monotone


def test_support_centred_cl2n_then_ncc_round_trips(tmp_path) -> None:
    xs, ys, xq, _ = make_task(seed=6)
    model = TaskModel.create("ncc", "cl2n-support").fit(xs, ys)
    mean = xs.mean(0)
    zs = (xs - mean) / np.linalg.norm(xs - mean, axis=1, keepdims=True)
    zq = (xq - mean) / np.linalg.norm(xq - mean, axis=1, keepdims=True)
    direct = make_head("ncc").fit(zs, ys).predict_proba(zq)
    np.testing.assert_allclose(model.predict_proba(xq), direct, rtol=1e-5, atol=1e-7)
    path = tmp_path / "task.npz"
    np.savez(path, **model.state())
    with np.load(path, allow_pickle=False) as z:
        again = TaskModel.from_state({k: z[k] for k in z.files})
    np.testing.assert_array_equal(again.predict_proba(xq), model.predict_proba(xq))
