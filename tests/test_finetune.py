"""Per-task fine-tuning of the backbone + a new linear head (`full-ft`, `maml`, `partial-ft`; train/finetune.py).

Each recipe's update rule is checked against a hand-written optimiser loop on a tiny network (gradients from
autograd, the optimiser arithmetic written here from the papers); the folded, re-exported task graph against
the unfolded torch network and head (ONNX Runtime vs torch); MACs to adapt against a hand count; and
`bench accuracy` / `bench macs` take every variant by name.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.adapters import ADAPTERS, finetuner_methods
from fsdeploy.train.finetune import fit_finetune, finetune_adapt_macs
from tests.helpers import glyph_folder, make_checkpoint

torch.set_num_threads(1)
SIZE = 32


class TinyNet(nn.Module):
    """conv(3->4, 3x3) -> BN -> ReLU -> conv(4->6, 3x3, stride 2) -> ReLU -> mean pool: features (N, 6)."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))).mean(dim=(2, 3))


def tiny_task(n: int = 4, k: int = 2, seed: int = 0) -> tuple[TinyNet, torch.Tensor, np.ndarray]:
    torch.manual_seed(seed)
    return TinyNet().eval(), torch.randn(n, 3, 8, 8), np.arange(n) % k


def _reference_head(dim: int, k: int, seed: int, zero: bool) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(dim, k)  # PyTorch's default init, as CloserLookFewShot's nn.Linear
    if zero:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


def _loss_grads(net: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = [*net.parameters(), *head.parameters()]
    loss = F.cross_entropy(head(net(x)), y)
    return list(torch.autograd.grad(loss, params))


def _final_params(net: nn.Module, head: nn.Linear) -> list[torch.Tensor]:
    return [p.detach() for p in (*net.parameters(), *head.parameters())]


def _result_params(res) -> list[torch.Tensor]:
    return [p.detach() for p in res.model.parameters()] + [torch.from_numpy(res.weight), torch.from_numpy(res.bias)]


def test_chen_recipe_is_sgd_with_momentum_dampening_and_weight_decay_on_every_weight() -> None:
    """Chen et al.'s loop (CloserLookFewShot baselinefinetune.py) on backbone + head, written out by hand:
    d = g + wd p; buf = d on the first step, then m buf + (1 - dampening) d; p -= lr buf."""
    net, x, labels = tiny_task(n=4)
    epochs, lr, mom, damp, wd = 3, 0.01, 0.9, 0.9, 1e-3
    res = fit_finetune(net, x, labels, steps=epochs, recipe="chen", seed=7, device="cpu")

    ref = TinyNet().eval()
    ref.load_state_dict(net.state_dict())
    head = _reference_head(6, 2, 7, zero=False)
    params = [*ref.parameters(), *head.parameters()]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    y = torch.as_tensor(labels)
    for _ in range(epochs):  # 4 images, batch 4: one step per epoch over the whole set (order does not matter)
        grads = _loss_grads(ref, head, x, y)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g + wd * p
                bufs[i] = d.clone() if bufs[i] is None else mom * bufs[i] + (1 - damp) * d
                p -= lr * bufs[i]
    for got, want in zip(_result_params(res), _final_params(ref, head)):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert len(res.losses) == epochs and res.changed_keys == tuple(n for n, _ in net.named_parameters())
    # BatchNorm keeps its pretrained running statistics (eval mode throughout)
    assert torch.equal(res.model.bn1.running_mean, net.bn1.running_mean)


def test_chen_recipe_batches_are_a_permutation_per_epoch() -> None:
    from fsdeploy.train.finetune import CHEN, batch_schedule

    batches = batch_schedule(10, 3, CHEN, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for e in range(3):
        assert sorted(torch.cat(batches[3 * e:3 * e + 3]).tolist()) == list(range(10))


def test_maml_inner_loop_is_plain_sgd_from_a_zero_head() -> None:
    """MAML's inner loop (Finn et al. 2017): θ ← θ − α ∇L_support, α = 0.01, whole support set per step."""
    net, x, labels = tiny_task(n=6, k=3)
    steps, alpha = 4, 0.01
    res = fit_finetune(net, x, labels, steps=steps, recipe="maml", device="cpu")
    ref = TinyNet().eval()
    ref.load_state_dict(net.state_dict())
    head = _reference_head(6, 3, 0, zero=True)
    y = torch.as_tensor(labels)
    for t in range(steps):
        grads = _loss_grads(ref, head, x, y)
        if t == 0:  # zero head: no gradient reaches the backbone on the first step
            assert all(float(g.abs().max()) == 0 for g in grads[:-2])
        with torch.no_grad():
            for p, g in zip([*ref.parameters(), *head.parameters()], grads):
                p -= alpha * g
    for got, want in zip(_result_params(res), _final_params(ref, head)):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)
    assert res.losses[0] == pytest.approx(math.log(3))


def test_full_ft_olor_is_adam_with_layerwise_rollback_on_the_backbone_and_plain_adam_on_the_head() -> None:
    """OLOR (Lu et al., AAAI 2024): Adam step, then θ ← (1−λ)θ + λθ₀ with λ = η_t κ/η₀ (1 − i/L) on the
    backbone tensors i = 0..L; the head plain Adam; η_t cosine from 1e-4."""
    net, x, labels = tiny_task(n=4)
    epochs, lr0, kappa, b1, b2, eps = 3, 1e-4, 0.01, 0.9, 0.999, 1e-8
    res = fit_finetune(net, x, labels, steps=epochs, recipe="olor", seed=3, device="cpu")
    ref = TinyNet().eval()
    ref.load_state_dict(net.state_dict())
    head = _reference_head(6, 2, 3, zero=False)
    backbone = list(ref.parameters())
    anchors = [p.detach().clone() for p in backbone]
    params = [*backbone, *head.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    y = torch.as_tensor(labels)
    n_last = len(backbone) - 1
    for t in range(epochs):
        lr = 0.5 * lr0 * (1 + math.cos(math.pi * t / epochs))
        grads = _loss_grads(ref, head, x, y)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mh, vh = m[i] / (1 - b1 ** (t + 1)), v[i] / (1 - b2 ** (t + 1))
                p -= lr * mh / (vh.sqrt() + eps)
                if i <= n_last:
                    lam = lr * (kappa / lr0) * (1 - i / n_last)
                    p.mul_(1 - lam).add_(anchors[i], alpha=lam)
    for got, want in zip(_result_params(res), _final_params(ref, head)):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_adapt_macs_equal_a_hand_count() -> None:
    """Per image: conv1 forward 8·8·4·27 and its weight grad (its input needs none), conv2 forward 4·4·6·36,
    input grad and weight grad; every recipe passes each support image once per epoch/step."""
    net, _, _ = tiny_task()
    c1, c2 = 8 * 8 * 4 * 27, 4 * 4 * 6 * 36
    assert finetune_adapt_macs(net, 8, 5, 3) == 3 * 5 * (2 * c1 + 3 * c2)
    # partial: conv2 alone trains; conv1 only runs forward and needs no gradient at all
    assert finetune_adapt_macs(net, 8, 5, 3, multipliers={"conv2": 0.1}) == 3 * 5 * (c1 + 2 * c2)


def test_cost_formula_equals_the_fit_counts_plus_the_classifier(bundle, counts) -> None:
    from fsdeploy.bench.cost_inputs import bundle_costs
    from fsdeploy.bench.costs import TaskShape
    from fsdeploy.runtime.open import torch_graphs

    backbone = torch_graphs(bundle)["features"].module
    rows = {r.method: r for r in bundle_costs(bundle, TaskShape.from_shots(3, 2), counts=counts).rows}
    for key, (kind, _) in finetuner_methods().items():
        if kind not in ("full-ft", "maml"):
            continue
        row = rows[key]
        fit = ADAPTERS.get(kind).fit_macs(backbone, SIZE, 6, row.steps)
        assert row.adapt_macs - row.head_macs == fit
        assert row.head_macs == row.steps * 3 * 6 * counts.dim * 3  # linear classifier: 3 x n D K per epoch/step


# ---- through the deployed path: a tiny resnet18 bundle at 32 px

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from fsdeploy.pipeline.export import export_bundle

    root = tmp_path_factory.mktemp("finetune")
    ckpt = make_checkpoint("resnet18", root / "w.safetensors", img_size=SIZE)
    export_bundle("resnet18", root / "bundle", checkpoint=ckpt, img_size=SIZE, validate=False)
    glyph_folder(root / "glyphs", classes="ABCD", per_class=4, size=40)
    return root


@pytest.fixture(scope="module")
def bundle(work):
    from fsdeploy.bundle import load_bundle

    return load_bundle(work / "bundle")


@pytest.fixture(scope="module")
def counts(bundle):
    from fsdeploy.bench.cost_inputs import count_bundle

    return count_bundle(bundle)


def _images(work: Path, bundle):
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked

    files = scan_image_folder(work / "glyphs")
    return load_checked(files.paths, bundle.manifest.preprocess), np.asarray(files.labels)


@pytest.mark.parametrize("key", ["full-ft", "full-ft-olor", "maml-10"])
def test_folded_task_graph_predicts_what_the_torch_network_and_head_predict(work, bundle, key) -> None:
    from fsdeploy.modules.fold import TaskWeights
    from fsdeploy.runtime import TaskAdapter
    from fsdeploy.runtime.open import torch_graphs

    kind_name, opts = finetuner_methods()[key]
    kind = ADAPTERS.get(kind_name)
    images, labels = _images(work, bundle)
    support = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(4)])
    query = np.setdiff1d(np.arange(len(labels)), support)
    with TaskAdapter(bundle, adapter=kind_name, steps=2, fit_opts=opts) as tuner:
        adapted = tuner.adapt(images[support], labels[support], list("ABCD"))
        probs = tuner.predict_proba(adapted.task, images[query])
    assert adapted.task.info["fold_max_abs"] <= 1e-4 and adapted.task.info["head"] == "linear"
    # the torch reference: the same (deterministic) fit, unfolded network + head in torch
    backbone = torch_graphs(bundle)["features"].module
    res = kind.fit(backbone, images[support], labels[support], steps=2, **opts)
    with torch.no_grad():
        want = torch.softmax(res.logits(res.model(torch.from_numpy(images[query]))), dim=1).numpy()
    assert np.abs(probs - want).max() <= 1e-4
    # the task carries every trained tensor in full; applied to the plain weights it is the fitted network
    weights = TaskWeights.from_arrays(adapted.task.task_state)
    assert set(weights.replaced) == {n for n, _ in backbone.named_parameters()}
    state = weights.apply(backbone.state_dict())
    for name, value in res.model.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-7), name


def _bench(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from fsdeploy.cli import app

    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["bench", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_bench_accuracy_and_macs_take_every_fine_tuner_by_name(work, bundle, monkeypatch) -> None:
    from dataclasses import replace

    from fsdeploy.bench import methods

    keys = [k for k, (kind, _) in finetuner_methods().items() if kind in ("full-ft", "maml")]
    for k in keys:  # the recipes' own step counts are benchmark-sized; 2 keeps this a smoke run of the names
        monkeypatch.setitem(methods.BY_KEY, k, replace(methods.BY_KEY[k], steps=2))
    out_json = work / "acc.json"
    code, out = _bench("accuracy", str(bundle.path), "--data", str(work / "glyphs"), "--ways", "2", "--shots", "1",
                       "--queries", "1", "--episodes", "1", "--heads", ",".join(keys), "--out", str(out_json))
    assert code == 0, out
    rows = json.loads(out_json.read_text())
    assert len(rows) == len(keys) and all(0 <= r["accuracy"] <= 100 for r in rows)
    code, out = _bench("macs", str(bundle.path), "--ways", "2", "--shots", "1", "--out", str(work / "macs.json"))
    assert code == 0, out
    costed = {r["method"] for r in json.loads((work / "macs.json").read_text())}
    assert set(keys) <= costed
