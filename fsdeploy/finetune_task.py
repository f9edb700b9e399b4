"""Per-task adaptation that needs gradients through the backbone: TSA residual adapters and BN-affine.

Both are fitted in PyTorch on the support set, then folded into the plain backbone's weights (exact), so
the deployed graph is the plain graph with new weights. The task artefact embeds that re-exported ONNX
graph (validated against the unfolded adapter network) plus the small per-task weight delta, and a
fixed head: TSA's β-aligned cosine NCC (`lt-ncc`, steps 0) or a cosine NCC for BN-affine.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy import __version__
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.images import load_checked
from fsdeploy.deps import require
from fsdeploy.errors import InvalidInput, ValidationFailed
from fsdeploy.exporters.bundle import Bundle
from fsdeploy.exporters.onnx_export import export_onnx
from fsdeploy.exporters.rebuild import torch_graphs
from fsdeploy.exporters.spec import ExportSpec
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.task import AdaptTimings, TaskArtefact, name_bad_images

METHODS = ("tsa", "bn-affine")


def _export_bytes(model: Any, example: Any, opset: int) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(model, (example,), Path(d) / "task.onnx", ExportSpec(opset=opset))
        return path.read_bytes()


def adapt_finetuned(
    bundle: Bundle, support: str | Path, out: str | Path | None, *, method: str = "tsa", steps: int = 40, atol: float = 1e-4,
    domain: str = "unseen", optimizer: str = "adadelta",
) -> tuple[TaskArtefact, AdaptTimings]:
    """Fit TSA (α + β) or BN-affine on `support`, fold, re-export, and write the task artefact.

    Args:
        domain: TSA only: 'unseen' (α 0.5, β 1.0) or 'seen' (α 0.05, β 0.1), upstream's two rate pairs.
        optimizer: BN-affine only: 'adadelta' or 'olor' (OLOR as published, see `fsdeploy.train.olor`).

    Raises:
        InvalidInput: the bundle is not a plain ResNet-family bundle, the support folder is bad, an
            unknown domain / optimizer, or one given to the adapter that does not use it.
        ValidationFailed: the folded ONNX graph disagrees with the adapter network.
    """
    torch = require("torch")
    from fsdeploy.train.tsa import TSA_LEARNING_RATES, bn_affine_adapt_macs, fit_bn_affine, fit_tsa, tsa_adapt_macs

    m = bundle.manifest
    if method not in METHODS:
        raise InvalidInput(f"unknown fine-tuning adapter {method!r}; choose one of {', '.join(METHODS)}")
    if domain not in TSA_LEARNING_RATES:
        raise InvalidInput(f"unknown --domain {domain!r}; choose one of {', '.join(TSA_LEARNING_RATES)}")
    if method == "tsa" and optimizer != "adadelta":
        raise InvalidInput(f"--optimizer {optimizer} is for --adapter bn-affine; TSA uses Adadelta (set --domain instead)")
    if method == "bn-affine" and domain != "unseen":
        raise InvalidInput("--domain picks TSA's learning rates; drop it for --adapter bn-affine")
    if m.adapter != "none":
        raise InvalidInput(f"--adapter {method} needs a plain bundle (adapter none); {bundle.path} has adapter {m.adapter}")
    if method == "tsa" and m.family != "resnet":
        raise InvalidInput(f"TSA residual adapters are defined for ResNet backbones; {bundle.path} holds {m.model} ({m.family})")
    t0 = time.perf_counter()
    files = scan_image_folder(support)
    images = load_checked(files.paths, m.preprocess)
    t1 = time.perf_counter()
    backbone = torch_graphs(bundle)["features"].module
    if method == "tsa":
        lr_alpha, lr_beta = TSA_LEARNING_RATES[domain]
        res = fit_tsa(backbone, images, files.labels, steps=steps, lr_alpha=lr_alpha, lr_beta=lr_beta)
        head = TaskModel.create("lt-ncc", "none", steps=0, init=res.beta)
        macs = tsa_adapt_macs(backbone, m.preprocess.input_size[-1], len(files), steps=steps)
    else:
        res = fit_bn_affine(backbone, images, files.labels, steps=steps, optimizer=optimizer)
        head = TaskModel.create("ncc", "none", distance="cosine", scale=10.0)
        macs = bn_affine_adapt_macs(backbone, m.preprocess.input_size[-1], len(files), steps=steps)
    folded = copy.deepcopy(backbone)
    folded.load_state_dict(res.folded_state())
    folded.eval()
    graph = _export_bytes(folded, torch.from_numpy(images[:2]), m.opset)
    t2 = time.perf_counter()
    from fsdeploy.engines.ort import OrtEngine

    engine = OrtEngine(graph)
    feats = np.concatenate([engine.run({"images": images[i : i + 32]})["features"] for i in range(0, len(images), 32)])
    with torch.no_grad():
        ref = res.model(torch.from_numpy(images)).numpy()
    diff = float(np.abs(feats - ref).max())
    if diff > atol:
        raise ValidationFailed(f"folded {method} graph differs from the adapter network by {diff:.3g} (> {atol:g}); nothing was written")
    with name_bad_images(files.paths, "support"):
        head.fit(feats, files.labels)
    t3 = time.perf_counter()
    weights = res.task_weights()
    state: dict[str, np.ndarray] = {"graph": np.frombuffer(graph, dtype=np.uint8)}
    info: dict[str, Any] = {
        "head": "lt-ncc" if method == "tsa" else "ncc-cosine", "adapter": method, "support": len(files), "steps": steps,
        "adapt_macs": int(macs), "fold_max_abs": diff, "task_weight_bytes": int(weights.nbytes), "fsdeploy": __version__,
        "losses": [float(v) for v in res.losses[:: max(1, len(res.losses) // 8)]],
    }
    if method == "tsa":
        info.update(domain=domain, lr_alpha=res.lr_alpha, lr_beta=res.lr_beta)
    else:
        info.update(optimizer=optimizer, lr=res.lr)
    task = TaskArtefact(m.bundle_id, m.model, m.adapter, files.classes, head.state(), state, info)
    if out is not None:
        task.save(out)
        weights.save(Path(out).with_suffix(f".{method}.npz"))
    t4 = time.perf_counter()
    return task, AdaptTimings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3)
