"""BD-CSPN (Liu et al., ECCV 2020) against a torch re-implementation written from easyfsl's `bd_cspn.py`
formula (generalised to the paper's temperature and top-Z), batch-order invariance, the transductive
hook of `predict_images`, and `bench accuracy --heads bd-cspn` on a tiny bundle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_heads_contract import make_task

from fsdeploy.errors import InvalidInput
from fsdeploy.heads import HEADS, TaskModel, make_head


def reference(xs, ys, xq, eps: float, top_z: int = 0, shift: bool = True, scale: float = 10.0) -> torch.Tensor:
    """Written out from the paper / easyfsl: shift queries, pseudo-label, weighted union mean, cosine classify."""
    s, q, y = (torch.as_tensor(a, dtype=torch.float64) for a in (xs, xq, ys))
    y = y.long()
    k = int(y.max()) + 1
    protos = torch.stack([s[y == c].mean(0) for c in range(k)])
    if shift:
        q = q + (s.mean(0, keepdim=True) - q.mean(0, keepdim=True))
    cos_q = F.normalize(q, dim=1) @ F.normalize(protos, dim=1).T
    cos_s = F.normalize(s, dim=1) @ F.normalize(protos, dim=1).T
    pseudo = cos_q.argmax(1)
    new = []
    for c in range(k):
        members = [(s[i], cos_s[i, c]) for i in range(len(y)) if y[i] == c]
        rows = [j for j in range(len(q)) if pseudo[j] == c]
        if top_z:
            conf = torch.softmax(eps * cos_q, 1)[:, c]
            rows = sorted(rows, key=lambda j: -float(conf[j]))[:top_z]
        members += [(q[j], cos_q[j, c]) for j in rows]
        w = torch.stack([torch.exp(eps * m[1]) for m in members])
        w = w / w.sum()
        new.append(sum(wi * m[0] for wi, m in zip(w, members)))
    rect = torch.stack(new)
    return torch.softmax(scale * F.normalize(q, dim=1) @ F.normalize(rect, dim=1).T, 1)


def test_registered_and_flagged_transductive() -> None:
    assert HEADS["bd-cspn"].transductive and not HEADS["ncc"].transductive
    assert "transductive" in (HEADS["bd-cspn"].__doc__ or "").splitlines()[0].lower()  # the `fsdeploy heads` summary


@pytest.mark.parametrize("opts", [{"epsilon": 1.0}, {}, {"epsilon": 10.0, "top_z": 3}, {"shift": False, "scale": 4.0},
                                  {"top_z": 1, "epsilon": 5.0}])
@pytest.mark.parametrize("shots", [1, 5])
def test_equals_the_reference(opts: dict, shots: int) -> None:
    xs, ys, xq, _ = make_task(seed=shots, k=5, shots=shots, dim=16, queries=7)
    ref = reference(xs, ys, xq, opts.get("epsilon", 10.0), opts.get("top_z", 0), opts.get("shift", True),
                    opts.get("scale", 10.0)).numpy()
    got = make_head("bd-cspn", **opts).fit(xs, ys).predict_proba(xq)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_epsilon_one_is_easyfsl_and_rectification_changes_the_prototypes() -> None:
    xs, ys, xq, _ = make_task(seed=4, k=3, shots=2, dim=8, queries=5)
    head = make_head("bd-cspn", epsilon=1.0).fit(xs, ys)
    _, rect = head.rectified(xq)
    assert not np.allclose(rect, head.protos_, atol=1e-3)  # the queries moved the prototypes
    ncc = make_head("ncc", distance="cosine").fit(xs, ys)
    assert not np.allclose(head.predict_proba(xq), ncc.predict_proba(xq), atol=1e-3)


def test_batch_order_invariance_and_batch_dependence() -> None:
    xs, ys, xq, _ = make_task(seed=2, k=4, shots=3, dim=10, queries=6)
    head = make_head("bd-cspn", top_z=2).fit(xs, ys)
    perm = np.random.default_rng(0).permutation(len(xq))
    np.testing.assert_allclose(head.predict_proba(xq[perm]), head.predict_proba(xq)[perm], rtol=1e-5, atol=1e-6)
    # transductive: the first query's probabilities change with the rest of the batch
    assert not np.allclose(head.predict_proba(xq[:3])[0], head.predict_proba(xq)[0], atol=1e-4)
    with pytest.raises(InvalidInput, match="at least one query"):
        head.predict_proba(xq[:0])
    with pytest.raises(InvalidInput, match="top_z"):
        make_head("bd-cspn", top_z=-1)


def test_task_model_and_huge_features() -> None:
    xs, ys, xq, _ = make_task(seed=6)
    model = TaskModel.create("bd-cspn", "l2").fit(xs, ys)
    np.testing.assert_allclose(model.predict_proba(xq).sum(1), 1.0, atol=1e-5)
    big = make_head("bd-cspn").fit(xs * 1e17, ys).predict_proba(xq * 1e17)  # float64 working precision
    np.testing.assert_allclose(big, make_head("bd-cspn").fit(xs, ys).predict_proba(xq), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import glyph_folder, tiny_bundle

    root = tmp_path_factory.mktemp("bdcspn")
    bundle = tiny_bundle(root)
    glyph_folder(root / "glyphs", classes="ABCDE", per_class=4, size=40)
    glyph_folder(root / "support", classes="ABC", per_class=2, size=40, seed=3)
    return root, bundle


def test_bench_accuracy_runs_bd_cspn_on_the_episode_query_set(tiny) -> None:
    from typer.testing import CliRunner

    from fsdeploy.bench.render import read_rows
    from fsdeploy.cli import app

    root, bundle = tiny
    out = root / "acc.json"
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, [
        "bench", "accuracy", str(bundle.path), "--data", str(root / "glyphs"), "--ways", "3", "--shots", "1",
        "--queries", "2", "--episodes", "2", "--methods", "bd-cspn,ncc", "--threads", "1",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = read_rows(out)
    assert [r["method"] for r in rows] == ["BD-CSPN (prototype rectification)", "NCC / ProtoNet"]
    assert all(0.0 <= r["accuracy"] <= 100.0 and r["episodes"] == 2 for r in rows)


def test_predict_images_scores_all_images_as_one_batch(tiny) -> None:
    from fsdeploy.runtime.adapt import TaskAdapter, adapt_task, predict_images
    from tests.helpers import glyph_folder

    root, bundle = tiny
    task, _ = adapt_task(bundle, root / "support", None, head="bd-cspn")
    imgs = sorted(glyph_folder(root / "query", classes="ABC", per_class=3, size=40, seed=7).rglob("*.png"))
    preds = predict_images(bundle, task, imgs, topk=3, batch=2)  # batch 2, yet one transductive batch of 9
    from fsdeploy.data.images import load_checked

    with TaskAdapter(bundle) as ta:
        probs = ta.predict_proba(task, load_checked(imgs, bundle.manifest.preprocess))
    for p, row in zip(preds, probs):
        assert p.probs[0] == pytest.approx(float(row.max()), rel=1e-5)


def easyfsl_formula(xs, ys, xq) -> torch.Tensor:
    """easyfsl's BDCSPN in its own matrix form (bd_cspn.py:28-55 at 8023ff4): exp(cos) logits, one-hot masks,
    one normalisation vector per class over support + pseudo-labelled queries; then cosine logits x 10."""
    s, q = (F.normalize(torch.as_tensor(a, dtype=torch.float64), dim=1) for a in (xs, xq))
    y = torch.as_tensor(ys).long()
    k = int(y.max()) + 1
    protos = torch.stack([s[y == c].mean(0) for c in range(k)])
    q = q + (s.mean(0, keepdim=True) - q.mean(0, keepdim=True))
    logit_s = (F.normalize(s, dim=1) @ F.normalize(protos, dim=1).T).exp()
    logit_q = (F.normalize(q, dim=1) @ F.normalize(protos, dim=1).T).exp()
    hot_s, hot_q = F.one_hot(y, k).double(), F.one_hot(logit_q.argmax(1), k).double()
    norm = ((hot_s * logit_s).sum(0) + (hot_q * logit_q).sum(0))[None]
    rect = (hot_s * logit_s / norm).T @ s + (hot_q * logit_q / norm).T @ q
    return torch.softmax(10.0 * F.normalize(q, dim=1) @ F.normalize(rect, dim=1).T, 1)


def test_default_is_the_papers_temperature_and_easyfsl_is_a_named_recipe() -> None:
    """Default eps = 10 (the paper's, module docstring); recipe=easyfsl is eps = 1, equal to easyfsl's own
    matrix formula on L2-normalised features (easyfsl normalises before rectifying)."""
    xs, ys, xq, _ = make_task(seed=7, k=4, shots=3, dim=12, queries=9)
    xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    default = make_head("bd-cspn")
    assert default.epsilon == 10.0 and default.recipe == "paper"
    np.testing.assert_allclose(default.fit(xs, ys).predict_proba(xq), reference(xs, ys, xq, 10.0).numpy(), rtol=1e-4, atol=1e-5)
    easy = make_head("bd-cspn", recipe="easyfsl").fit(xs, ys)
    assert easy.epsilon == 1.0
    np.testing.assert_allclose(easy.predict_proba(xq), easyfsl_formula(xs, ys, xq).numpy(), rtol=1e-4, atol=1e-5)
    _, rect10 = default.rectified(xq)
    _, rect1 = easy.rectified(xq)
    assert not np.allclose(rect10, rect1, atol=1e-4)  # the temperature matters: the two recipes differ
    assert make_head("bd-cspn", epsilon=3.0, recipe="easyfsl").epsilon == 3.0  # an explicit epsilon wins
    with pytest.raises(InvalidInput, match="recipe must be one of paper, easyfsl"):
        make_head("bd-cspn", recipe="liu")
    with pytest.raises(InvalidInput, match="epsilon must be a number"):
        make_head("bd-cspn", epsilon="ten")


def test_recipe_survives_a_save_and_load() -> None:
    xs, ys, xq, _ = make_task(seed=1, k=3, shots=2, dim=8, queries=4)
    model = TaskModel.create("bd-cspn", "none", recipe="easyfsl")
    model.fit(xs, ys)
    again = TaskModel.from_state(model.state())
    assert again.head.epsilon == 1.0 and again.head.recipe == "easyfsl"
    np.testing.assert_allclose(again.predict_proba(xq), model.predict_proba(xq), rtol=1e-6)
