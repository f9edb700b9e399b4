"""`export_bundle`: build the adapted torch module, export each graph, validate it on ONNX Runtime against
PyTorch (each graph at its own tolerance), write the bundle atomically."""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy import __version__
from fsdeploy.atomic import atomic_dir, sha256_file
from fsdeploy.backbones import family_of
from fsdeploy.data.folders import list_images
from fsdeploy.data.images import load_batch
from fsdeploy.data.samples import real_batch
from fsdeploy.deps import require
from fsdeploy.adapters import build_adapted
from fsdeploy.backbones import BuildRequest
from fsdeploy.compare import CompareReport, Tolerance, compare
from fsdeploy.engines import EngineOptions, open_engine
from fsdeploy.errors import ValidationFailed
from fsdeploy.bundle import (
    SCHEMA,
    TORCH_WEIGHTS,
    Bundle,
    BundleManifest,
    GraphInfo,
    hash_files,
    load_bundle,
    write_manifest,
)
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport
from fsdeploy.exporters.onnx_export import export_onnx
from fsdeploy.exporters.weights_checks import size_hint, warn_weights, weights_record
from fsdeploy.outputs import check_bundle_out

Progress = Callable[[str], None]


def library_versions() -> dict[str, str]:
    """Versions of the packages that shape a bundle's numerics."""
    out = {"fsdeploy": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "timm", "onnx", "onnxruntime"):
        try:
            out[mod] = require(mod).__version__
        except Exception:  # optional at read time
            out[mod] = "absent"
    return out


def torch_outputs(graph: GraphExport, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph's torch module on named numpy feeds; outputs by name as float64-safe numpy."""
    torch = require("torch")
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in graph.spec.inputs]
    with torch.inference_mode():
        out = graph.eager(*args)
    if not isinstance(out, (tuple, list)):
        out = (out,)
    return {n: o.detach().cpu().numpy() for n, o in zip(graph.spec.outputs, out)}


def validation_inputs(built: AdaptedModel, *, calib: list[Path] | None, n: int, seed: int) -> dict[str, np.ndarray]:
    """Random-normal and real image batches in the model's preprocessing."""
    rng = np.random.default_rng(seed)
    shape = built.preprocess.input_size
    real = load_batch(calib[:n], built.preprocess) if calib else real_batch(built.preprocess, n, rng)
    return {"random": rng.standard_normal((n, *shape)).astype(np.float32), "real": real}


CPU_ONLY = EngineOptions(providers=("CPUExecutionProvider",))


def validate_graphs(
    built: AdaptedModel, folder: Path, sets: dict[str, np.ndarray], atol: float | None = None
) -> CompareReport:
    """Compare every exported graph in `folder` with its torch module on each input set, each graph judged
    by its own export spec's tolerance (`atol` overrides every graph's absolute part)."""
    checks = []
    per_graph = {}
    for graph in built.graphs:
        per_graph[graph.name] = Tolerance(graph.spec.atol if atol is None else atol, graph.spec.rtol)
        with open_engine(folder / graph.filename, "ort", CPU_ONLY) as engine:
            for set_name, images in sets.items():
                feeds = graph.feeds(images)
                checks += compare(graph.name, set_name, engine.run(feeds), torch_outputs(graph, feeds))
    default = Tolerance(max(t.atol for t in per_graph.values()), max(t.rtol for t in per_graph.values()))
    return CompareReport(tuple(checks), default, per_graph, what="ONNX Runtime vs PyTorch")


def export_bundle(
    model: str,
    out: str | Path,
    *,
    adapter: str = "none",
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    opset: int = 17,
    validate: bool = True,
    calib: str | Path | None = None,
    n_validate: int = 4,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> tuple[Bundle, CompareReport | None]:
    """Export `model` (+ `adapter`) to a validated bundle folder at `out`.

    Args:
        model: timm model name.
        out: bundle folder; replaced as a whole only when export and validation succeed.
        adapter: registered adapter kind (`none`, `case`, `toast`).
        checkpoint: local weights (.pth/.safetensors).
        pretrained: timm hub weights (needs network).
        img_size: input resolution (default from checkpoint or model).
        opset: ONNX opset (>= 17 keeps LayerNorm one node).
        validate: compare ONNX Runtime with PyTorch and refuse a bundle outside tolerance.
        calib: folder of real images for validation (default: photos shipped with matplotlib).
        options: adapter-specific build options (recorded, used again when rebuilding the torch module).
        overwrite: replace an existing bundle at `out` (anything else there is always refused).

    Raises:
        ValidationFailed: an output exceeded tolerance (nothing is written).
        InvalidInput: `out` is not a new folder or (with `overwrite`) a bundle, or is not writable.
    """
    say = progress or (lambda _msg: None)
    out = Path(out)
    check_bundle_out(out, overwrite=overwrite)
    warn_weights(model, checkpoint, pretrained, img_size)
    request = BuildRequest(model, Path(checkpoint) if checkpoint else None, pretrained, img_size, dict(options or {}))
    say(f"building {model} (adapter {adapter})")
    built = build_adapted(adapter, request)
    report: CompareReport | None = None
    with atomic_dir(out) as tmp:
        sets = validation_inputs(built, calib=list_images([calib]) if calib else None, n=n_validate, seed=0)
        infos: dict[str, GraphInfo] = {}
        for i, graph in enumerate(built.graphs, 1):
            spec = replace(graph.spec, opset=opset)
            example = tuple(require("torch").from_numpy(v) for v in graph.feeds(sets["random"][:2]).values())
            say(f"exporting {graph.filename}" + (f" (graph {i}/{len(built.graphs)})" if len(built.graphs) > 1 else ""))
            export_onnx(graph.module, example, tmp / graph.filename, spec)
            with open_engine(tmp / graph.filename, "ort", CPU_ONLY) as eng:
                infos[graph.name] = GraphInfo(graph.filename, eng.input_specs(), eng.output_specs())
        if validate:
            say(f"validating {len(built.graphs)} graph{'s' if len(built.graphs) > 1 else ''} against PyTorch")
            report = validate_graphs(built, tmp, sets)
            if not report.passed:
                raise ValidationFailed(
                    f"{report.describe_worst()}; nothing was written — check the model, or pass --no-validate to keep it anyway"
                    + size_hint(checkpoint, img_size)
                )
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in built.module.state_dict().items()}
        save_file(state, str(tmp / TORCH_WEIGHTS))
        first = built.graphs[0]
        feat = torch_outputs(first, first.feeds(sets["random"][:1]))["features"]
        source = {
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
            "pretrained": pretrained,
            "options": request.options,
            **weights_record(checkpoint, pretrained, built.preprocess),
        }
        manifest = BundleManifest(
            schema=SCHEMA,
            model=model,
            family=family_of(model),
            adapter=adapter,
            preprocess=built.preprocess,
            feature_dim=int(feat.shape[-1]),
            opset=opset,
            graphs=infos,
            files=hash_files(tmp, [g.filename for g in built.graphs] + [TORCH_WEIGHTS]),
            validation=report.to_dict() if report else {"skipped": True},
            versions=library_versions(),
            source=source,
            extra=built.extra,
        )
        write_manifest(tmp, manifest)
    return load_bundle(out), report
