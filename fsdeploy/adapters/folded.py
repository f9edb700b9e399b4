"""What the per-task fine-tuners (TSA, BN-affine) share: fit in PyTorch, fold, re-export, check the fold.

Each fine-tuner trains on the support set, then folds the result into the plain backbone's weights
(exact), so the deployed graph is the plain graph with new weights. The task stores that re-exported
ONNX graph (checked against the unfolded network), the per-task weights in `TaskWeights` form (the same
arrays, so the `torch` backend rebuilds the folded module from them), and the kind's head.
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.adapters.base import AdapterKind
from fsdeploy.bundle import Bundle
from fsdeploy.compare import CompareReport, Tolerance, compare
from fsdeploy.deps import require
from fsdeploy.engines import open_engine
from fsdeploy.errors import InvalidInput, ValidationFailed
from fsdeploy.exporters.onnx_export import export_onnx
from fsdeploy.exporters.spec import ExportSpec
from fsdeploy.runtime.open import torch_graphs
from fsdeploy.runtime.task import name_bad_images

# folded graph vs the unfolded adapter network: the bound `fsdeploy export` validates every graph with (1e-4 plus
# 1e-4 of the largest feature), widened by NOISE_FACTOR x the adapter network's own float32 rounding error (its
# float32 features against the same network in float64). Fine-tuning can leave weights whose rounding is amplified
# through the depth (BatchNorm channels with running variance ~0 scale by up to 1/sqrt(eps) = 316): a healthy
# MAML/full fine-tuning fold then differs by more than a fixed bound while both graphs are equally far from the
# exact result. A wrong fold moves features by their own order of magnitude and still fails.
FOLD_TOL = Tolerance(atol=ExportSpec.atol, rtol=ExportSpec.rtol)
NOISE_FACTOR = 10.0


def float32_noise(model: Any, images: np.ndarray, ref32: np.ndarray) -> float:
    """max |model(images) in float32 - the same in float64|: the rounding a float32 graph of `model` cannot avoid."""
    torch = require("torch")
    exact = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        ref64 = exact(torch.from_numpy(images).to(torch.float64)).numpy()
    return float(np.max(np.abs(ref32.astype(np.float64) - ref64))) if ref64.size else 0.0


CHECK_BATCH = 32


@dataclass(frozen=True)
class FoldedTask:
    """A fitted fine-tuner: task state (graph + weights), the fitted head, and what it cost."""

    task_state: dict[str, np.ndarray]
    head: Any  # a fitted TaskModel
    feats: np.ndarray  # support features through the folded graph
    check: CompareReport
    info: dict[str, Any] = field(default_factory=dict)
    fit_ms: float = 0.0


def export_bytes(model: Any, example: Any, opset: int) -> bytes:
    """The ONNX bytes of `model` at the bundle's opset."""
    with tempfile.TemporaryDirectory() as d:
        return export_onnx(model, (example,), Path(d) / "task.onnx", ExportSpec(opset=opset)).read_bytes()


def check_bundle(kind: AdapterKind, bundle: Bundle) -> None:
    """Refuse a bundle the fine-tuner cannot adapt.

    Raises:
        InvalidInput: another adapter kind, or a backbone family the kind does not support.
    """
    m = bundle.manifest
    if m.adapter != kind.bundle_adapter:
        raise InvalidInput(f"--adapter {kind.name} needs a bundle of adapter {kind.bundle_adapter}; {bundle.path} has adapter {m.adapter}")
    if kind.families and m.family not in kind.families:
        raise InvalidInput(f"the {kind.name} adapter is defined for {', '.join(kind.families)} backbones; {bundle.path} holds {m.model} ({m.family})")


def fit_folded(kind: AdapterKind, bundle: Bundle, images: np.ndarray, labels: np.ndarray, *, steps: int,
               backend: str = "ort", options: Any = None, fit_opts: dict[str, Any] | None = None,
               paths: Sequence[str | Path] = ()) -> FoldedTask:
    """Fit `kind` on one support set, fold, re-export, check the folded graph, fit the kind's head on its features.

    Raises:
        InvalidInput: see `check_bundle`.
        ValidationFailed: the folded graph disagrees with the adapter network beyond `FOLD_TOL`.
    """
    torch = require("torch")
    check_bundle(kind, bundle)
    kind.check_options(fit_opts or {})
    assert kind.fit is not None and kind.head is not None
    t0 = time.perf_counter()
    backbone = torch_graphs(bundle)["features"].module
    res = kind.fit(backbone, images, labels, steps=steps, **(fit_opts or {}))
    if hasattr(res, "export_module"):  # a graph the plain one cannot hold (eTT's prefix tokens)
        folded = res.export_module()
    else:
        folded = copy.deepcopy(backbone)
        folded.load_state_dict(res.folded_state())
    folded.eval()
    graph = export_bytes(folded, torch.from_numpy(images[:2]), bundle.manifest.opset)
    weights = res.task_weights()
    fit_ms = (time.perf_counter() - t0) * 1e3
    state: dict[str, np.ndarray] = {"graph": np.frombuffer(graph, dtype=np.uint8), **weights.to_arrays(),
                                    **(res.extra_arrays() if hasattr(res, "extra_arrays") else {})}
    with open_engine(graph, "ort") as engine:
        feats = np.concatenate([engine.run({"images": images[i:i + CHECK_BATCH]})["features"] for i in range(0, len(images), CHECK_BATCH)])
    with torch.no_grad():
        ref = res.model(torch.from_numpy(images)).numpy()
        noise = float32_noise(res.model, images, ref)
    tol = Tolerance(FOLD_TOL.atol + NOISE_FACTOR * noise, FOLD_TOL.rtol)
    report = CompareReport(tuple(compare("task", "support", {"features": feats}, {"features": ref})), tol,
                           what=f"folded {kind.name} graph vs the adapter network")
    if not report.passed:
        raise ValidationFailed(f"{report.describe_worst('the adapter network')}; nothing was written")
    head = kind.head(res)
    with name_bad_images(paths, "support"):
        head.fit(feats, labels)
    recipe = {k: getattr(res, k) for k in ("lr_alpha", "lr_beta", "lr", "optimizer") if hasattr(res, k)}
    info = {"adapter": kind.name, "steps": steps, **(fit_opts or {}), **recipe, "fold_max_abs": report.checks[0].max_abs, "fold_noise": noise,
            "task_weight_bytes": int(weights.nbytes), "losses": [float(v) for v in res.losses[:: max(1, len(res.losses) // 8)]]}
    if getattr(res, "adapt_macs", 0):  # counted by the fit itself (it depends on the task's ways: eTT)
        info["adapt_macs"] = int(res.adapt_macs)
    elif kind.fit_macs is not None:
        info["adapt_macs"] = int(kind.fit_macs(backbone, bundle.manifest.preprocess.input_size[-1], len(images), steps,
                                               **(fit_opts or {})))  # partial-ft: its spec decides what trains
    return FoldedTask(state, head, feats, report, info, fit_ms)
