"""Issue 19: SimpleShot's base mean, channel importance on signed features, baseline++ above 200 classes, and bad
features refused. Each recipe against a small re-implementation written here from the official code:
mileyan/simple_shot (`metric_class_type`), Frankluox/Channel_Importance_FSL (`simple_transform`, `PN_head`),
wyharveychen/CloserLookFewShot (`distLinear`, `set_forward_adaptation`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsdeploy.errors import InvalidInput
from fsdeploy.heads import HEADS, TaskModel, make_head
from fsdeploy.heads.base import NonFiniteFeatures
from fsdeploy.heads.baseline import draw_epochs, uniform_init
from fsdeploy.runtime.task import name_bad_images


def episode(rng: np.random.Generator, ways: int, shots: int, queries: int, dim: int, signed: bool = False):
    """Gaussian classes around a shared offset (the base mean matters), support sorted by class."""
    offset = 3.0 * rng.standard_normal(dim)
    means = offset + rng.standard_normal((ways, dim))
    ys, yq = np.repeat(np.arange(ways), shots), np.repeat(np.arange(ways), queries)
    xs = means[ys] + 1.2 * rng.standard_normal((ys.size, dim))
    xq = means[yq] + 1.2 * rng.standard_normal((yq.size, dim))
    if signed:  # SiLU outputs: mostly negative, as the shipped efficientnet_b0's features
        xs, xq = (torch.nn.functional.silu(torch.from_numpy(a) - 1.5).numpy() for a in (xs, xq))
    return xs.astype(np.float32), ys, xq.astype(np.float32), yq, offset


# ---- 1. SimpleShot


def official_simpleshot(gallery, query, train_mean, ways, shot):
    """simple_shot `metric_class_type(norm_type='CL2N')` with num_NN = 1: support sorted by class here."""
    g = (gallery - train_mean) / np.linalg.norm(gallery - train_mean, 2, 1)[:, None]
    q = (query - train_mean) / np.linalg.norm(query - train_mean, 2, 1)[:, None]
    protos = g.reshape(ways, shot, -1).mean(1)
    distance = np.linalg.norm(protos[:, None, :] - q, 2, axis=-1)
    return distance.argmin(axis=0)


@pytest.mark.parametrize("shots", [1, 5])
def test_simpleshot_with_the_base_mean_equals_the_official_code(shots: int) -> None:
    rng = np.random.default_rng(shots)
    agree, total = 0, 0
    for _ in range(40):
        xs, ys, xq, _, offset = episode(rng, 5, shots, 15, 32)
        base_mean = (offset + 0.5 * rng.standard_normal(32)).astype(np.float32)
        ours = TaskModel.create("ncc", "cl2n", transform_opts={"mean": base_mean}).fit(xs, ys).predict(xq)
        ref = official_simpleshot(xs.astype(np.float64), xq.astype(np.float64), base_mean.astype(np.float64), 5, shots)
        agree += int((ours == ref).sum())
        total += ref.size
    assert agree == total
    # the support mean is another method: it changes predictions on these episodes
    xs, ys, xq, _, offset = episode(np.random.default_rng(0), 5, 1, 15, 32)
    base = TaskModel.create("ncc", "cl2n", transform_opts={"mean": offset.astype(np.float32)}).fit(xs, ys)
    support = TaskModel.create("ncc", "cl2n-support").fit(xs, ys)
    assert not np.allclose(base.predict_proba(xq), support.predict_proba(xq), atol=1e-3)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory):
    from tests.helpers import glyph_folder, make_checkpoint
    from tests.test_cli import invoke

    tmp = tmp_path_factory.mktemp("simpleshot")
    ckpt = make_checkpoint("resnet18", tmp / "w.safetensors", img_size=32)
    base = glyph_folder(tmp / "base", classes="WXYZ", per_class=3, size=32, seed=4)
    (base / "splits.json").write_text(json.dumps({"base": ["W", "X", "Y"], "novel": ["Z"]}))
    code, out = invoke("export", "resnet18", "--checkpoint", str(ckpt), "--no-validate", "--out", str(tmp / "plain"))
    assert code == 0, out
    code, out = invoke("export", "resnet18", "--checkpoint", str(ckpt), "--no-validate", "--base-data", str(base),
                       "--out", str(tmp / "with-mean"))
    assert code == 0, out
    assert "base-class mean of 9 images in 3 classes" in out  # the base split only
    glyph_folder(tmp / "support", classes="ABC", per_class=3, size=32, seed=0)
    return tmp, ckpt, base


def test_bundle_stores_the_base_mean_of_the_exported_features(bundles) -> None:
    from fsdeploy.backbones import create_backbone
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_batch
    from fsdeploy.bundle import load_bundle

    tmp, ckpt, base = bundles
    plain, with_mean = load_bundle(tmp / "plain"), load_bundle(tmp / "with-mean")
    assert with_mean.manifest.bundle_id == plain.manifest.bundle_id  # graph files only
    rec = with_mean.manifest.extra["base_mean"]
    assert rec["images"] == 9 and rec["file"] in with_mean.manifest.files
    model, pre = create_backbone("resnet18", checkpoint=ckpt)
    files = scan_image_folder(base, classes=["W", "X", "Y"])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(load_batch(files.paths, pre))).double().mean(0).numpy()
    stored = np.load(tmp / "with-mean" / rec["file"])
    np.testing.assert_allclose(stored, ref, rtol=1e-4, atol=1e-5)


def test_adapt_cl2n_uses_the_bundle_mean_and_refuses_without(bundles) -> None:
    from tests.test_cli import invoke

    tmp, _, _ = bundles
    code, out = invoke("adapt", str(tmp / "with-mean"), str(tmp / "support"), "--head", "ncc", "--transform", "cl2n",
                       "--out", str(tmp / "t.npz"))
    assert code == 0, out
    with np.load(tmp / "t.npz") as z:
        np.testing.assert_array_equal(z["head/transform.mean_"], np.load(tmp / "with-mean" / "base_mean.npy"))
    code, out = invoke("adapt", str(tmp / "plain"), str(tmp / "support"), "--head", "ncc", "--transform", "cl2n",
                       "--out", str(tmp / "u.npz"))
    assert code == 1 and "no base-class mean" in out and "--base-data" in out and "\n" not in out.strip()
    assert not (tmp / "u.npz").exists()
    code, out = invoke("export", "resnet18", "--adapter", "case", "--base-data", str(tmp / "support"), "--out", str(tmp / "c"))
    assert code == 1 and "drop it for --adapter case" in out and not (tmp / "c").exists()


# ---- 2. channel importance


def official_ci_protonet(support: np.ndarray, query: np.ndarray, ways: int, shot: int) -> np.ndarray:
    """Channel_Importance_FSL: `simple_transform` (beta 1.3), L2, class means, L2, cosine (`PN_head.forward`)."""

    def simple_transform(x: torch.Tensor, beta: float) -> torch.Tensor:
        zero = torch.zeros_like(x)
        pos, neg = torch.maximum(x, zero), torch.minimum(x, zero)
        return 1 / torch.pow(torch.log(1 / (pos + 1e-5) + 1), beta) - 1 / torch.pow(torch.log(1 / (-neg + 1e-5) + 1), beta)

    s = F.normalize(simple_transform(torch.from_numpy(support).double(), 1.3), p=2, dim=1, eps=1e-12)
    q = F.normalize(simple_transform(torch.from_numpy(query).double(), 1.3), p=2, dim=1, eps=1e-12)
    protos = F.normalize(s.reshape(ways, shot, -1).mean(1), p=2, dim=1, eps=1e-12)  # support sorted by class here
    return (q @ protos.T).numpy()


@pytest.mark.parametrize("shots", [1, 5])
def test_channel_importance_equals_the_official_head_on_signed_features(shots: int) -> None:
    rng = np.random.default_rng(10 + shots)
    for _ in range(20):
        xs, ys, xq, _, _ = episode(rng, 5, shots, 10, 64, signed=True)
        assert (xs < 0).mean() > 0.5  # like the shipped backbone's features (68% negative)
        model = TaskModel.create("ncc", "ci", distance="cosine", scale=10.0).fit(xs, ys)
        cos = official_ci_protonet(xs, xq, 5, shots)
        np.testing.assert_array_equal(model.predict(xq), cos.argmax(1))
        ref = torch.softmax(torch.from_numpy(10.0 * cos), 1).numpy()
        np.testing.assert_allclose(model.predict_proba(xq), ref, rtol=0, atol=2e-5)


# ---- 5. baseline++ above 200 classes


def torch_baseline_pp(xs, ys, k, order, v0):
    """CloserLookFewShot distLinear (scale 2 up to 200 outputs, 10 above) + set_forward_adaptation's SGD loop."""
    scale = 2 if k <= 200 else 10
    lin = torch.nn.Linear(xs.shape[1], k, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(v0))
    lin = torch.nn.utils.parametrizations.weight_norm(lin, name="weight", dim=0)
    x = torch.from_numpy(xs).double()
    x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
    y = torch.from_numpy(ys)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    for perm in order:
        for i in range(0, len(perm), 4):
            idx = torch.from_numpy(perm[i : i + 4])
            opt.zero_grad()
            F.cross_entropy(scale * lin(x[idx]), y[idx]).backward()
            opt.step()
    return lin.weight.detach().numpy(), scale


@pytest.mark.parametrize("ways", [200, 201])
def test_baseline_plus_plus_scale_switches_above_200_classes(ways: int) -> None:
    rng = np.random.default_rng(ways)
    d, epochs = 8, 3
    xs = rng.standard_normal((ways, d)).astype(np.float32)  # 1-shot
    ys = np.arange(ways)
    head = make_head("baseline++", epochs=epochs).fit(xs, ys, rng=np.random.default_rng(1))
    g = np.random.default_rng(1)
    v0, _ = uniform_init(g, ways, d, bias=False)
    weight, scale = torch_baseline_pp(xs, ys, ways, draw_epochs(g, ways, epochs), v0)
    assert float(head.scale_) == scale == (10 if ways > 200 else 2)
    np.testing.assert_allclose(head.weight_, weight, rtol=0, atol=2e-5)
    assert make_head("baseline++", scale=2.0, epochs=1).fit(xs, ys).scale_ == 2.0  # an explicit scale is kept


# ---- 6. bad features


def _task(k: int = 3, n: int = 4, d: int = 6):
    rng = np.random.default_rng(0)
    return rng.random((k * n, d)).astype(np.float32), np.repeat(np.arange(k), n), rng.random((5, d)).astype(np.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_non_finite_features_are_refused_naming_the_rows(name: str, value: float) -> None:
    xs, ys, xq = _task()
    bad = xs.copy()
    bad[7, 2] = value  # one value of one support feature
    with pytest.raises(NonFiniteFeatures, match=r"support feature rows 7 contain NaN or inf"):
        make_head(name).fit(bad, ys)
    with pytest.raises(NonFiniteFeatures, match=r"support feature rows 7 "):
        TaskModel.create(name, "ci").fit(bad, ys)  # before a transform could map inf to a finite number
    opts = {"epochs": 2} if name.startswith("baseline") else {"iters": 5} if name == "linear" else {}
    head = make_head(name, **opts).fit(xs, ys)
    badq = xq.copy()
    badq[[1, 3], 0] = value
    with pytest.raises(NonFiniteFeatures, match=r"query feature rows 1, 3 contain"):
        head.predict_proba(badq)


def test_task_level_errors_name_the_images(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    xs, ys, _ = _task(2, 2)
    xs[2, 0] = np.nan
    with pytest.raises(NonFiniteFeatures, match=r"^support images .*2\.png gave NaN or inf features; check") as err, \
            name_bad_images(paths, "support"):
        TaskModel.create("ncc").fit(xs, ys)
    assert "\n" not in str(err.value) and "0.png" not in str(err.value)


@pytest.mark.parametrize("labels", [[0, 0.7, 1, 1], [0.0, 1.0, 1.0, np.nan], [True, False, True, False]])
def test_non_integer_labels_are_refused(labels) -> None:
    xs = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    with pytest.raises(InvalidInput, match="labels must be integer class indices"):
        make_head("ncc").fit(xs, np.asarray(labels))
    with pytest.raises(InvalidInput, match="labels must be integer class indices"):
        TaskModel.create("ncc", "l2").fit(xs, np.asarray(labels))
    make_head("ncc").fit(xs, np.asarray([0.0, 0.0, 1.0, 1.0]))  # whole numbers stored as floats are fine


@pytest.mark.parametrize("head,transform,opts", [
    ("ncc", "none", {}), ("ncc", "ci", {}), ("ncc", "l2", {"distance": "cosine"}), ("ncc", "cl2n-support", {}),
    ("baseline", "none", {"epochs": 5}), ("baseline++", "none", {"epochs": 5}), ("linear", "none", {"iters": 50}),
    ("linear-newton", "none", {}), ("lt-ncc", "none", {"steps": 3}),
])
def test_large_finite_features_stay_finite(head: str, transform: str, opts: dict) -> None:
    """Features scaled to 1e20 used to overflow to NaN (ncc, ncc+ci, baseline): same task, same answers as at 1."""
    xs, ys, xq = _task()
    big = TaskModel.create(head, transform, **opts).fit(1e20 * xs, ys, rng=np.random.default_rng(0))
    probs = big.predict_proba(1e20 * xq)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    if head in ("ncc",) and transform in ("ci", "l2", "cl2n-support"):  # scale-free pipelines: identical answers
        small = TaskModel.create(head, transform, **opts).fit(xs, ys).predict_proba(xq)
        if transform != "ci":
            np.testing.assert_allclose(probs, small, atol=1e-5)
    state = big.state()
    assert all(np.isfinite(v).all() for v in state.values() if np.issubdtype(np.asarray(v).dtype, np.floating))


# ---- 3 and 9 on the CLI: OLOR on BN-affine, TSA's seen/unseen rates


@pytest.mark.slow  # two PyTorch fits, folds and re-exports
def test_adapt_finetuning_options(bundles) -> None:
    from fsdeploy.runtime import TaskArtefact
    from tests.test_cli import invoke

    tmp, _, _ = bundles
    code, out = invoke("adapt", str(tmp / "plain"), str(tmp / "support"), "--adapter", "tsa", "--domain", "seen",
                       "--steps", "1", "--out", str(tmp / "tsa.npz"))
    assert code == 0, out
    info = TaskArtefact.load(tmp / "tsa.npz").info
    assert (info["domain"], info["lr_alpha"], info["lr_beta"]) == ("seen", 0.05, 0.1)
    code, out = invoke("adapt", str(tmp / "plain"), str(tmp / "support"), "--adapter", "bn-affine", "--optimizer", "olor",
                       "--steps", "1", "--out", str(tmp / "bn.npz"))
    assert code == 0, out
    assert TaskArtefact.load(tmp / "bn.npz").info["optimizer"] == "olor"
    code, out = invoke("adapt", str(tmp / "plain"), str(tmp / "support"), "--adapter", "tsa", "--optimizer", "olor",
                       "--out", str(tmp / "x.npz"))
    assert code == 1 and "is for --adapter bn-affine" in out
    code, out = invoke("adapt", str(tmp / "plain"), str(tmp / "support"), "--adapter", "tsa", "--domain", "near",
                       "--out", str(tmp / "x.npz"))
    assert code == 1 and "unknown --domain 'near'" in out and not (tmp / "x.npz").exists()


def test_base_split_must_exist(tmp_path) -> None:
    """`export --base-split NAME` on a folder without splits.json is refused, not silently ignored."""
    from fsdeploy.errors import InvalidInput
    from fsdeploy.pipeline.base_mean import split_classes

    assert split_classes(tmp_path, "base") is None and split_classes(tmp_path, "all") is None
    with pytest.raises(InvalidInput, match="--base-split nope: .* has no splits.json"):
        split_classes(tmp_path, "nope")
