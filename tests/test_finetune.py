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
from fsdeploy.errors import InvalidInput
from fsdeploy.train.finetune import fit_finetune, finetune_adapt_macs
from tests.helpers import glyph_folder

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


@pytest.mark.parametrize("bn", ["batch", "frozen"])
def test_maml_inner_loop_is_plain_sgd_from_a_zero_head(bn: str) -> None:
    """MAML's inner loop (Finn et al. 2017): θ ← θ − α ∇L_support, α = 0.01, whole support set per step;
    BatchNorm on batch statistics (MAML's, the default) or frozen running statistics."""
    net, x, labels = tiny_task(n=6, k=3)
    steps, alpha = 4, 0.01
    res = fit_finetune(net, x, labels, steps=steps, recipe="maml", bn=None if bn == "batch" else bn, device="cpu")
    ref = TinyNet().eval()
    ref.load_state_dict(net.state_dict())
    if bn == "batch":
        ref.bn1.train()  # torch's own batch-statistics BatchNorm, running statistics updated with momentum 0.1
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
    stats = ("bn1.running_mean", "bn1.running_var")
    assert (set(stats) <= set(res.changed_keys)) == (bn == "batch") and not res.model.bn1.training
    for key in stats:  # batch: the running statistics moved as torch's own BatchNorm moved them; frozen: untouched
        assert torch.allclose(res.model.state_dict()[key], ref.state_dict()[key], atol=1e-7)
        assert torch.equal(res.model.state_dict()[key], net.state_dict()[key]) == (bn == "frozen")


@pytest.mark.parametrize("name,published", [("full-ft", "frozen"), ("maml", "batch")])  # partial-ft: chen, as full-ft
def test_each_kind_defaults_to_its_published_batchnorm_and_takes_the_other(name: str, published: str) -> None:
    """Chen et al.: eval-mode features (CloserLookFewShot save_features.py:120), so frozen statistics; MAML:
    batch statistics (cbfinn/maml utils.py:41, CloserLookFewShot backbone.py:88-102). Checked on the
    running statistics: untouched when frozen, moved when batch."""
    net, x, labels = tiny_task(n=6, k=3)
    opts: dict = {}
    kind = ADAPTERS.get(name)
    before = net.bn1.running_var.clone()
    for bn in (None, "frozen", "batch"):
        res = kind.fit(net, x, labels, steps=2, bn=bn, device="cpu", **opts) if bn else kind.fit(net, x, labels, steps=2, device="cpu", **opts)
        mode = bn or published
        assert res.bn == mode
        assert torch.equal(res.model.bn1.running_var, before) == (mode == "frozen")
    with pytest.raises(InvalidInput, match="unknown --bn 'train'"):
        kind.fit(net, x, labels, steps=1, bn="train", device="cpu", **opts)


def test_full_ft_olor_is_adam_with_layerwise_rollback_on_the_backbone_and_plain_adam_on_the_head() -> None:
    """OLOR (Lu et al., AAAI 2024): Adam step, then θ ← (1−λ)θ + λθ₀ with λ = η_t κ/η₀ (1 − i/L) on the
    backbone tensors i = 0..L; the head plain Adam; η_t warmed up, then cosine from 1e-4."""
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
    for t in range(epochs):  # OLOR/train.py: warm-up (10% of the steps: here step 0, factor 0.01), then cosine
        lr = lr0 * 0.01 if t < 0.1 * epochs else 0.5 * lr0 * (1 + math.cos(math.pi * t / epochs))
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
        if kind not in ("full-ft", "maml", "partial-ft"):
            continue
        row = rows[key]
        fit = ADAPTERS.get(kind).fit_macs(backbone, SIZE, 6, row.steps)  # partial-ft: the default spec, the last block
        assert row.adapt_macs - row.head_macs == fit
        assert row.head_macs == row.steps * 3 * 6 * counts.dim * 3  # linear classifier: 3 x n D K per epoch/step


# ---- through the deployed path: a tiny resnet18 bundle at 32 px

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.helpers import tiny_bundle

    root = tmp_path_factory.mktemp("finetune")
    tiny_bundle(root, img_size=SIZE)
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


@pytest.mark.parametrize("key", ["full-ft", "full-ft-olor", "maml-10", "partial-ft"])
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
    assert set(weights.replaced) == set(res.changed_keys)
    trained = {n for n, _ in backbone.named_parameters()} if kind_name != "partial-ft" else {
        n for n, _ in backbone.named_parameters() if n.startswith("layer4.1.")}  # default spec: the last block
    if kind_name == "maml":  # batch-statistics BatchNorm: the running statistics are task weights too
        trained |= {f"{n}.{b}" for n, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)
                    for b in ("running_mean", "running_var")}
    assert set(res.changed_keys) == trained
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

    keys = [k for k, (kind, _) in finetuner_methods().items() if kind in ("full-ft", "maml", "partial-ft")]
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


# ---- partial fine-tuning (Shen et al., AAAI 2021): layer units, multipliers, the search, the spec file

def test_units_split_block_sequences_into_blocks() -> None:
    from fsdeploy.backbones import create_backbone
    from fsdeploy.train.partial_search import units_of

    assert units_of(TinyNet()) == ["conv1", "bn1", "conv2"]
    r18, _ = create_backbone("resnet18", img_size=SIZE)
    units = units_of(r18)
    assert units[:2] == ["conv1", "bn1"] and units[2:] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    # every parameter belongs to exactly one unit
    for name, _ in r18.named_parameters():
        assert sum(name.startswith(u + ".") for u in units) == 1, name


def test_partial_rule_trains_only_the_listed_units_at_their_rates() -> None:
    """Chen's SGD (as in the full-ft test) with lr 0.01 x multiplier per unit; multiplier 0 or unlisted: frozen."""
    net, x, labels = tiny_task(n=4)
    mults = {"conv1": 0.0, "conv2": 0.1}
    res = fit_finetune(net, x, labels, steps=3, recipe="chen", multipliers=mults, seed=1, device="cpu")
    ref = TinyNet().eval()
    ref.load_state_dict(net.state_dict())
    head = _reference_head(6, 2, 1, zero=False)
    trained = [(p, 0.01 * 0.1) for p in ref.conv2.parameters()] + [(p, 0.01) for p in head.parameters()]
    for p in ref.parameters():
        p.requires_grad_(False)
    for p, _ in trained:
        p.requires_grad_(True)
    bufs: list[torch.Tensor | None] = [None] * len(trained)
    y = torch.as_tensor(labels)
    for _ in range(3):
        grads = torch.autograd.grad(F.cross_entropy(head(ref(x)), y), [p for p, _ in trained])
        with torch.no_grad():
            for i, ((p, lr), g) in enumerate(zip(trained, grads)):
                d = g + 1e-3 * p
                bufs[i] = d.clone() if bufs[i] is None else 0.9 * bufs[i] + 0.1 * d
                p -= lr * bufs[i]
    for got, want in zip(_result_params(res), _final_params(ref, head)):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)
    assert res.changed_keys == ("conv2.weight", "conv2.bias")
    assert torch.equal(res.model.conv1.weight, net.conv1.weight) and torch.equal(res.model.bn1.weight, net.bn1.weight)


def test_search_finds_the_best_genome_of_a_known_fitness_and_is_seeded() -> None:
    """A separable fitness with one optimum: mutation + crossover of the top k reach it; same seed, same run."""
    from fsdeploy.train.partial_search import SearchSettings, search

    net = TinyNet()
    target = (0.0, 0.1, 1.0)
    calls = []

    def fitness(g):
        calls.append(g)
        return -sum(abs(a - b) for a, b in zip(g, target))

    settings = SearchSettings(population=8, select=3, mutation=3, crossover=3, iterations=6, mutation_prob=0.4, seed=2)
    spec = search(net, [], settings, fitness=fitness)
    assert spec.units == ("conv1", "bn1", "conv2") and spec.multipliers == target and spec.fitness == 0
    assert len(calls) == len(set(calls)) == spec.search["evaluated"] <= 8 * 6  # each genome scored once
    assert spec.search["best_per_iteration"] == sorted(spec.search["best_per_iteration"])  # the top k never loses its best
    again = search(net, [], settings, fitness=lambda g: -sum(abs(a - b) for a, b in zip(g, target)))
    assert again.search["best_per_iteration"] == spec.search["best_per_iteration"]


def test_small_search_on_real_tasks_scores_what_fine_tuning_scores(tmp_path) -> None:
    from fsdeploy.train.partial_search import PartialSpec, SearchSettings, ValTask, search, task_accuracy

    net, x, labels = tiny_task(n=4)
    torch.manual_seed(5)
    tasks = [ValTask(x.numpy(), labels, torch.randn(6, 3, 8, 8).numpy(), np.arange(6) % 2)]
    spec = search(net, tasks, SearchSettings.small(), model="tiny")
    # the recorded fitness is the mean query accuracy of fine-tuning with the winning multipliers
    again = task_accuracy(net, tasks[0], spec.as_dict(), SearchSettings.small().epochs, seed=0)
    assert spec.fitness == pytest.approx(again)
    back = PartialSpec.load(spec.save(tmp_path / "spec.json"))
    assert back == spec
    back.check_backbone(TinyNet())


def test_bad_specs_are_one_line_errors(tmp_path) -> None:
    from fsdeploy.errors import InvalidInput
    from fsdeploy.train.partial_search import PartialSpec

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="cannot read a partial-ft spec"):
        PartialSpec.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(InvalidInput, match="not a version-1 partial-ft spec"):
        PartialSpec.load(tmp_path / "other.json")
    spec = PartialSpec(("conv1", "bn1", "conv2"), (0.0, 0.0, 1.0))
    from fsdeploy.backbones import create_backbone

    with pytest.raises(InvalidInput, match="searched on another backbone"):
        spec.check_backbone(create_backbone("resnet18", img_size=SIZE)[0])


def test_searched_spec_drives_partial_ft_at_adapt_time(work, bundle) -> None:
    """search_bundle on the bundle's own backbone writes a spec; adapt --adapter partial-ft --spec trains
    exactly its units, through the folded graph, and costs what it trains."""
    from fsdeploy.modules.fold import TaskWeights
    from fsdeploy.runtime import TaskAdapter
    from fsdeploy.train.partial_search import SearchSettings, search_bundle

    out = work / "spec.json"
    spec = search_bundle(bundle.path, work / "glyphs", out, split="all", settings=SearchSettings.small(epochs=1),
                         n_tasks=1, ways=2, shots=1, queries=1)
    assert spec.model == "resnet18" and out.is_file()
    images, labels = _images(work, bundle)
    with TaskAdapter(bundle, adapter="partial-ft", steps=1, fit_opts={"spec": str(out)}) as tuner:
        adapted = tuner.adapt(images[:8], labels[:8], list("AB"))
    info = adapted.task.info
    assert info["fold_max_abs"] <= 1e-4 and info["spec"] == str(out)
    keys = set(TaskWeights.from_arrays(adapted.task.task_state).replaced)
    from fsdeploy.runtime.open import torch_graphs

    backbone = torch_graphs(bundle)["features"].module
    assert keys == {n for n, _ in backbone.named_parameters() if any(n.startswith(u + ".") for u in spec.trained_units())}
    assert info["adapt_macs"] == ADAPTERS.get("partial-ft").fit_macs(backbone, SIZE, 8, 1, spec=str(out))


def test_search_names_the_queries_that_fit_the_split(work, bundle, tmp_path) -> None:
    """4 images per class: 1-shot tasks with 15 queries cannot be drawn; the error names the largest count that
    fits (3), from the module's command line as one line with exit 1, and nothing is written."""
    from fsdeploy.train.partial_search import SearchSettings, main, search_bundle

    with pytest.raises(InvalidInput, match=r"pass --queries 3 or fewer"):
        search_bundle(bundle.path, work / "glyphs", tmp_path / "s.json", split="all", settings=SearchSettings.small(),
                      n_tasks=1, ways=2, shots=1, queries=15)
    with pytest.raises(SystemExit) as stop:
        main([str(bundle.path), str(work / "glyphs"), "--out", str(tmp_path / "s.json"), "--split", "all", "--small"])
    assert stop.value.code == 1 and not (tmp_path / "s.json").exists()


def test_adapt_cli_takes_the_spec_and_refuses_a_bad_one(work, bundle) -> None:
    from typer.testing import CliRunner

    from fsdeploy.cli import app
    from fsdeploy.runtime import TaskArtefact
    from fsdeploy.train.partial_search import PartialSpec, units_of
    from fsdeploy.runtime.open import torch_graphs

    units = units_of(torch_graphs(bundle)["features"].module)
    spec = PartialSpec(tuple(units), tuple(0.1 if u == "layer3.1" else 0.0 for u in units), model="resnet18").save(work / "l3.json")
    runner = CliRunner(env={"COLUMNS": "300"})
    args = ["adapt", str(bundle.path), str(work / "glyphs"), "--adapter", "partial-ft", "--steps", "1"]
    result = runner.invoke(app, [*args, "--spec", str(spec), "--out", str(work / "p.npz")])
    assert result.exit_code == 0, result.output
    task = TaskArtefact.load(work / "p.npz")
    trained = [k[4:] for k in task.task_state if k.startswith("set/")]
    assert trained and all(k.startswith("layer3.1.") for k in trained)
    (work / "junk.json").write_text("[]")
    result = runner.invoke(app, [*args, "--spec", str(work / "junk.json"), "--out", str(work / "q.npz")])
    from fsdeploy.errors import InvalidInput  # the CLI's entry point prints it as one line (cli.FsdeployError)

    assert isinstance(result.exception, InvalidInput) and "not a version-1 partial-ft spec" in str(result.exception)
    assert not (work / "q.npz").exists()


def test_a_diverging_fit_stops_with_a_one_line_error_and_lr_is_an_option() -> None:
    from fsdeploy.errors import InvalidInput

    net, x, labels = tiny_task(n=6, k=3)
    with pytest.raises(InvalidInput, match=r"maml fine-tuning diverged at step \d+ of 50 .*pass a lower lr"):
        ADAPTERS.get("maml").fit(net, x, labels, steps=50, lr=1e12)
    with pytest.raises(InvalidInput, match="--lr must be a positive number"):
        ADAPTERS.get("full-ft").fit(net, x, labels, steps=1, lr="fast")
    res = ADAPTERS.get("full-ft").fit(net, x, labels, steps=1, lr=0.5)
    assert res.lr == 0.5
    ADAPTERS.get("partial-ft").check_options({"spec": "s.json", "lr": 0.1})


@pytest.mark.slow
def test_search_at_the_published_population_keeps_improving_on_real_fine_tuning() -> None:
    """The SPOS-style budget (population 50, top 10, 25 + 25 children) for 3 iterations, 5 epochs per task,
    on two tiny tasks: every strategy is fine-tuned for real; the best never gets worse and beats freezing all."""
    from fsdeploy.train.partial_search import SearchSettings, ValTask, search, task_accuracy

    net, _, _ = tiny_task()
    torch.manual_seed(11)
    tasks = [ValTask(torch.randn(4, 3, 8, 8).numpy(), np.arange(4) % 2, torch.randn(8, 3, 8, 8).numpy(), np.arange(8) % 2)
             for _ in range(2)]
    settings = SearchSettings(iterations=3, epochs=5)
    spec = search(net, tasks, settings)
    best = spec.search["best_per_iteration"]
    assert best == sorted(best) and spec.search["evaluated"] >= 50
    frozen = np.mean([task_accuracy(net, t, {u: 0.0 for u in spec.units}, 5, seed=i) for i, t in enumerate(tasks)])
    assert spec.fitness >= frozen


def test_search_defaults_are_the_spos_searchers_as_documented() -> None:
    """The module docstring says the budget is SPOS's official one (megvii-model/SinglePathOneShot
    src/Search/search.py:240-245: max-epochs 20, select-num 10, population-num 50, m_prob 0.1, crossover-num 25,
    mutation-num 25) and the genome has 10 genes on resnet18, 20 on efficientnet_b0."""
    import timm

    from fsdeploy.train.partial_search import MULTIPLIERS, SearchSettings, units_of

    s = SearchSettings()
    assert (s.iterations, s.select, s.population, s.mutation_prob, s.crossover, s.mutation) == (20, 10, 50, 0.1, 25, 25)
    assert s.epochs == 100 and MULTIPLIERS == (0.0, 0.01, 0.1, 1.0)
    assert [len(units_of(timm.create_model(n, num_classes=0))) for n in ("resnet18", "efficientnet_b0")] == [10, 20]


def test_a_wrong_fold_is_refused_although_rounding_noise_widens_the_bound(work, bundle) -> None:
    """The fold check allows NOISE_FACTOR x the network's own float32 rounding (float32 vs float64), which must stay
    far below what a wrong fold does: here one BatchNorm folded with 4x its running variance."""
    from dataclasses import replace

    from fsdeploy.adapters.folded import NOISE_FACTOR, fit_folded, float32_noise
    from fsdeploy.errors import ValidationFailed

    kind = ADAPTERS.get("full-ft")
    images, labels = _images(work, bundle)
    support = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(4)])

    class Tampered:
        def __init__(self, res):
            self._res = res

        def __getattr__(self, name):
            return getattr(self._res, name)

        def folded_state(self):
            state = dict(self._res.folded_state())
            key = next(k for k in state if k.endswith("running_var"))
            state[key] = state[key] * 4.0
            return state

    noise = {}

    def wrong_fit(*args, **kw):
        res = kind.fit(*args, **kw)
        with torch.no_grad():
            ref = res.model(torch.from_numpy(images[support])).numpy()
        noise["f32"] = float32_noise(res.model, images[support], ref)
        return Tampered(res)

    with pytest.raises(ValidationFailed, match="differs from the adapter network"):
        fit_folded(replace(kind, fit=wrong_fit), bundle, images[support], labels[support], steps=1)
    assert 0 < NOISE_FACTOR * noise["f32"] < 1e-3  # the allowance is rounding-sized on a healthy network
    task = fit_folded(kind, bundle, images[support], labels[support], steps=1)  # the untampered fold passes
    assert task.info["fold_max_abs"] <= 1e-4 and task.info["fold_noise"] > 0
