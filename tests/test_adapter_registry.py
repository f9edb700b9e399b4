"""Every registered adapter kind exports, adapts, predicts, is costed (and builds with TensorRT where installed).

Parametrized over `fsdeploy.adapters.ADAPTERS`, so a new kind is covered the moment it registers: the test
fails until it has a case below. A toy kind registered from this file shows that a new kind needs its own
file only (here: this test), no edit anywhere else.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fsdeploy.adapters import ADAPTERS, AdapterKind, register_adapter
from fsdeploy.backbones import BuildRequest, create_backbone
from fsdeploy.bench.cost_inputs import bundle_costs
from fsdeploy.bench.costs import DEFAULT_METHODS, TaskShape
from fsdeploy.bundle import load_bundle
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.images import load_checked
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport, images_only
from fsdeploy.exporters.spec import ExportSpec
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.runtime import TaskArtefact, adapt_task, predict_images
from fsdeploy.runtime.paths import PlainPath
from tests.helpers import glyph_folder, make_checkpoint

SIZE = 32
# kind -> (timm model, the exported kind whose bundle it runs on)
CASES = {
    "none": ("resnet18", "none"),
    "case": ("resnet18", "case"),
    "toast": ("vit_tiny_patch16_224", "toast"),
    "tsa": ("resnet18", "none"),
    "bn-affine": ("resnet18", "none"),
    "ett": ("vit_tiny_patch16_224", "none"),
    "full-ft": ("resnet18", "none"),
    "maml": ("resnet18", "none"),
    "partial-ft": ("resnet18", "none"),
    "toy-scale": ("resnet18", "toy-scale"),
}


# ---- a toy kind: a fixed per-channel scale after the pooled features. Everything it needs is here.

class ScaledFeatures(nn.Module):
    """The backbone's pooled features times a fixed, deterministic per-channel scale (a stand-in adapter)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        dim = int(backbone.num_features)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images) * self.scale


def build_toy(request: BuildRequest) -> AdaptedModel:
    backbone, pre = create_backbone(request.model, checkpoint=request.checkpoint, img_size=request.img_size)
    module = ScaledFeatures(backbone).eval()
    return AdaptedModel(module, pre, (GraphExport("features", module, ExportSpec(), images_only),))


def count_toy(model: nn.Module, size: int):
    from fsdeploy.adapters.none import count_plain

    return count_plain(model.backbone, size)


TOY = AdapterKind(
    name="toy-scale", summary="test-only: a fixed per-channel scale on the pooled features", build=build_toy,
    feature_path=lambda bundle, backend, options, **_: PlainPath(bundle, backend, options), count=count_toy,
    default_heads=("ncc",),
)


@pytest.fixture(scope="module", autouse=True)
def toy_kind():
    register_adapter(TOY)
    yield
    ADAPTERS.remove(TOY.name)


def test_every_registered_kind_has_a_case() -> None:
    assert set(ADAPTERS.names()) == set(CASES), "add the new adapter kind to CASES"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    glyph_folder(root / "support", classes="ABC", per_class=2, size=40)
    glyph_folder(root / "query", classes="ABC", per_class=2, size=40, seed=5)
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bundles")
    made = {}

    def get(model: str, exported: str):
        if (model, exported) not in made:
            ckpt = make_checkpoint(model, root / f"{model}.safetensors", img_size=SIZE)
            made[model, exported] = export_bundle(model, root / f"{model}-{exported}", adapter=exported, checkpoint=ckpt,
                                                  img_size=SIZE)[0]
        return made[model, exported]

    return get


_COUNTS: dict[Path, object] = {}


def _counts(bundle):
    """Per-image counts of a bundle's real modules (the slow part of costing), once per bundle."""
    from fsdeploy.bench.cost_inputs import count_bundle

    if bundle.path not in _COUNTS:
        _COUNTS[bundle.path] = count_bundle(load_bundle(bundle.path))
    return _COUNTS[bundle.path]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_kind_exports_adapts_predicts_and_is_costed(kind: str, data: Path, bundles, tmp_path: Path) -> None:
    model, exported = CASES[kind]
    bundle = bundles(model, exported)
    k = ADAPTERS.get(kind)
    # exports: a validated bundle of the exported kind
    assert bundle.manifest.adapter == exported and bundle.manifest.validation["passed"]
    # adapts through the one adapt API, writes an artefact that loads back
    adapter = kind if k.finetuner else None
    task, _ = adapt_task(bundle, data / "support", tmp_path / "task.npz", adapter=adapter, head="ncc", steps=2)
    loaded = TaskArtefact.load(tmp_path / "task.npz")
    assert loaded.classes == ("A", "B", "C") and set(loaded.task_state) == set(task.task_state)
    if k.finetuner:
        assert "graph" in loaded.task_state and loaded.info["fold_max_abs"] <= 1e-4
    # predicts through the deployed path: probabilities equal to the head on the engine's own features
    preds = predict_images(bundle, loaded, [data / "query"], topk=3)
    assert len(preds) == 6 and all(abs(sum(p.probs) - 1) < 1e-4 for p in preds)
    # ... and the torch backend (the reference module, folded for fine-tuners) agrees with ONNX Runtime
    ref = predict_images(bundle, loaded, [data / "query"], topk=3, backend="torch")
    assert [p.labels for p in ref] == [p.labels for p in preds]
    assert np.allclose([p.probs for p in ref], [p.probs for p in preds], atol=1e-3)
    # costed: the kind's own row (or its bundle's head rows) from counts on the real modules
    costs = bundle_costs(bundle, TaskShape.from_shots(3, 2), counts=_counts(bundle))
    keys = {r.method for r in costs.rows}
    wanted = next(iter(k.methods), "") or k.head_methods.get("linear") or "ncc"
    assert wanted in keys or wanted in costs.skipped
    if wanted in keys:
        row = next(r for r in costs.rows if r.method == wanted)
        assert row.adapt_macs > 0 and row.query_macs > 0


def test_toy_kind_features_are_its_module(bundles, data: Path) -> None:
    """The toy bundle's engine features equal its torch module's: the registry's build reached export."""
    bundle = bundles("resnet18", "toy-scale")
    images = load_checked(scan_image_folder(data / "support").paths, bundle.manifest.preprocess)
    from fsdeploy.runtime import open_graph, torch_graphs

    with open_graph(bundle, "features", "ort") as eng:
        got = eng.run({"images": images})["features"]
    module = torch_graphs(bundle)["features"].module
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert isinstance(module, ScaledFeatures)


def test_default_methods_name_only_registered_formulas() -> None:
    from fsdeploy.bench.costs import FORMULAS

    assert {m.kind for m in DEFAULT_METHODS} <= set(FORMULAS.names())


def test_fine_tuners_refuse_other_bundles(bundles) -> None:
    from fsdeploy.errors import InvalidInput
    from fsdeploy.runtime import TaskAdapter

    with pytest.raises(InvalidInput, match="needs a bundle of adapter none"):
        TaskAdapter(bundles("resnet18", "case"), adapter="tsa")
    with pytest.raises(InvalidInput, match="exported into a bundle"):
        TaskAdapter(bundles("resnet18", "none"), adapter="case")
    assert replace(TOY, families=("resnet",)).check_family("resnet", "x") is None


def test_torch_backend_rebuilds_the_module_once_per_bundle(bundles, data: Path, tmp_path: Path, monkeypatch) -> None:
    """A CaSE adapt on --backend torch opens ~4 graphs (context or stages, gamma, query) from one rebuilt CaseNet."""
    import fsdeploy.exporters.rebuild as rebuild
    import fsdeploy.runtime.open as runtime_open

    bundle = bundles("resnet18", "case")
    calls = []
    real = rebuild.build_adapted
    monkeypatch.setattr(rebuild, "build_adapted", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(runtime_open, "_TORCH_CACHE", {})
    task, _ = adapt_task(bundle, data / "support", None, head="ncc", backend="torch", batch=2)  # chunked: every stage
    predict_images(bundle, task, [data / "query"], backend="torch")
    assert len(calls) == 1
