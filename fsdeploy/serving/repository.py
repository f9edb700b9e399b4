"""Write a Triton model repository from a bundle and its task artefacts.

Layout (Triton's model repository: one folder per model with config.pbtxt and numbered versions):

    REPO/fsdeploy_repository.json    what was exported, for `serve` and the Python models
    REPO/bundle/                     the bundle, hash-checked (preprocessing, adapt's graphs)
    REPO/tasks/<task id>.npz         the task store: fsdeploy task artefacts, read while serving
    REPO/models/                     the Triton model repository (`--model-repository=REPO/models`):
    REPO/models/preprocess/                 IMAGE bytes -> PIXELS (fsdeploy's decode + timm eval transform)
    REPO/models/task_state/                 TASK_ID -> TASK_KEY (id@version) [+ GAMMA for CaSE]
    REPO/models/features/                   PIXELS [+ GAMMA (N, G)] -> FEATURES; dynamic batching
    REPO/models/head/                       FEATURES + TASK_KEY -> PROBS, top-k LABELS / SCORES; one model, every task
    REPO/models/classify/                   ensemble: IMAGE + TASK_ID -> LABELS, SCORES, PROBS
    REPO/models/classify_pixels/            ensemble: PIXELS (already preprocessed) + TASK_ID -> the same
    REPO/models/adapt/                      support IMAGES + LABELS + TASK_ID -> fits and stores a new task
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.errors import InvalidInput, UnknownName, ValidationFailed
from fsdeploy.serving import config as cfg
from fsdeploy.serving import links
from fsdeploy.serving.pymodel import MODEL_PY
from fsdeploy.serving.roles import MANIFEST
from fsdeploy.serving.store import check_task_id

SCHEMA = 1
MODELS = "models"  # the folder Triton reads; bundle/ and tasks/ sit beside it, where Triton does not look
PYTHON_MODELS = ("preprocess", "task_state", "head", "adapt")


@dataclass(frozen=True)
class RepositoryInfo:
    """What `write_repository` wrote."""

    path: Path
    backend: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    check: dict[str, Any] | None  # batched-γ graph vs the bundle's query graph (CaSE)
    pending: tuple[str, ...]  # files to build on the target (TensorRT plans)


def default_sys_path() -> list[str]:
    """The folder holding the `fsdeploy` package this process runs, for the Python models' sys.path."""
    return [str(Path(links.__file__).resolve().parents[2])]


def _task_ids(tasks: Sequence[str | Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for t in tasks:
        text = str(t)
        task_id, sep, path = text.partition("=")
        p = Path(path) if sep else Path(text)
        task_id = task_id if sep else p.stem
        check_task_id(task_id)
        if task_id in out:
            raise InvalidInput(f"task id {task_id!r} given twice ({out[task_id]} and {p}); name one ID=PATH")
        out[task_id] = p
    return out


def write_repository(
    bundle_path: str | Path,
    tasks: Sequence[str | Path],
    out: str | Path,
    *,
    backend: str = "python",
    device: str | None = None,
    max_batch: int = 32,
    topk: int = 5,
    queue_delay_us: int = 2000,
    instances: int = 1,
    threads: int | None = None,
    sys_path: Sequence[str] | None = None,
) -> RepositoryInfo:
    """Write the repository to `out`, atomically (a failure leaves any old `out` as it was).

    Args:
        tasks: task artefacts (.npz); each is served under its file stem, or `ID=PATH` names it.
        backend: the features model: python (ONNX Runtime inside the Python backend, runs with the
            PyTriton server), onnxruntime (`onnxruntime_onnx`), tensorrt (`tensorrt_plan`, plan built on target).
        device: gpu or cpu for the features model (default gpu for onnxruntime/tensorrt, cpu for python).
        max_batch: Triton max_batch_size for every batched model (rows per execution).
        queue_delay_us: dynamic batcher's max_queue_delay_microseconds.
        threads: ONNX Runtime threads per Python model instance (None: ORT's default).
        sys_path: folders the Python models put first on sys.path (default: this fsdeploy's source root).

    Raises:
        UnknownName: unknown backend or device.
        InvalidInput: bad task id or option; a folded task with a shared-graph backend.
        BundleError: bundle or task unreadable, or a task fitted on another bundle.
        ValidationFailed: the batched-γ query graph disagrees with the bundle's.
    """
    if backend not in cfg.BACKENDS:
        raise UnknownName(f"unknown --backend {backend!r}; choose one of {', '.join(cfg.BACKENDS)}")
    device = device or ("cpu" if backend == "python" else "gpu")
    if device not in cfg.DEVICES:
        raise UnknownName(f"unknown --device {device!r}; choose cpu or gpu")
    if backend == "tensorrt" and device != "gpu":
        raise InvalidInput("--backend tensorrt runs on a GPU; drop --device cpu (or use --backend onnxruntime)")
    if max_batch < 1 or topk < 1 or instances < 1 or queue_delay_us < 0:
        raise InvalidInput(f"--max-batch, --topk, --instances must be >= 1 and --queue-delay-us >= 0 (got {max_batch}, {topk}, {instances}, {queue_delay_us})")
    bundle = links.load_bundle(bundle_path)
    m = bundle.manifest
    case = m.adapter == links.CASE_ADAPTER
    task_files = _task_ids(tasks)
    loaded = {}
    for task_id, path in task_files.items():
        task = links.TaskArtefact.load(path)
        task.check_bundle(bundle, path)
        if links.TASK_GRAPH_KEY in task.task_state and backend != "python":
            raise InvalidInput(
                f"task {path} carries its own folded graph (TSA / BN-affine); --backend {backend} serves one shared "
                "features graph, so use --backend python for folded tasks"
            )
        loaded[task_id] = task
    _, h, w = m.preprocess.input_size
    gamma_size = m.case_layout().gamma_size if case else None
    check = None
    if case:
        from fsdeploy.serving.batched_gamma import batched_gamma_graph, validate_batched

        query = bundle.graph_path(links.QUERY_GRAPH)
        graph = batched_gamma_graph(query)
        rng = np.random.default_rng(0)
        gammas = [np.asarray(t.task_state["gamma"], np.float32) for t in loaded.values()]
        # tasks' own γ when there are any, plus perturbed identities so that rows always differ
        gammas += [1.0 + 0.2 * rng.standard_normal(gamma_size).astype(np.float32) for _ in range(2)]
        result = validate_batched(query, graph, (3, h, w), np.stack(gammas))
        check = result.to_dict()
        if not result.passed:
            raise ValidationFailed(
                f"batched-γ query graph differs from {query} by {result.max_abs:.2e} > {result.atol:g}; re-export the bundle"
            )
    else:
        graph = bundle.graph_path(links.FEATURES_GRAPH).read_bytes()
    paths = list(sys_path) if sys_path is not None else default_sys_path()
    pending: list[str] = []
    with links.atomic_dir(out) as tmp:
        shutil.copytree(bundle.path, tmp / "bundle")
        (tmp / "tasks").mkdir()
        for task_id, path in task_files.items():
            shutil.copyfile(path, tmp / "tasks" / f"{task_id}.npz")
        specs = _specs(backend, device, case, max_batch, topk, queue_delay_us, instances, threads, paths,
                       (3, h, w), gamma_size, m.feature_dim)
        for spec in specs:
            folder = tmp / MODELS / spec.name
            (folder / "1").mkdir(parents=True)
            (folder / "config.pbtxt").write_text(cfg.render(spec))
            if spec.backend == "python":
                (folder / "1" / "model.py").write_text(MODEL_PY)
        features = tmp / MODELS / "features"
        (features / "1" / "model.onnx").write_bytes(graph)
        if backend == "tensorrt":
            (features / "build_plan.sh").write_text(_plan_script(max_batch, (3, h, w), gamma_size))
            os.chmod(features / "build_plan.sh", 0o755)
            pending.append(f"{MODELS}/features/1/model.plan")
        manifest = {
            "schema": SCHEMA, "bundle_id": m.bundle_id, "model": m.model, "adapter": m.adapter, "backend": backend,
            "device": device, "max_batch": max_batch, "topk": topk, "gamma_size": gamma_size,
            "feature_dim": m.feature_dim, "preprocess": m.preprocess.to_dict(), "models": [s.name for s in specs],
            "tasks": sorted(task_files), "folded_tasks": backend == "python" and not case, "sys_path": paths,
            "batched_gamma_check": check, "pending": pending, "fsdeploy": links.__version__,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return RepositoryInfo(Path(out), backend, tuple(s.name for s in specs), tuple(sorted(task_files)), check, tuple(pending))


def _plan_script(max_batch: int, image: tuple[int, int, int], gamma_size: int | None) -> str:
    """trtexec line that builds features/1/model.plan on the target GPU (plans are tied to GPU and TensorRT version)."""
    c, h, w = image

    def shapes(n: int) -> str:
        s = f"images:{n}x{c}x{h}x{w}"
        return s + (f",gamma:{n}x{gamma_size}" if gamma_size else "")

    return (
        "#!/usr/bin/env bash\n"
        "# Build the TensorRT plan for this repository's features model on the GPU that will serve it,\n"
        "# e.g. inside the official Triton container (it ships trtexec). FP16, batch 1..max_batch.\n"
        "set -euo pipefail\ncd \"$(dirname \"$0\")/1\"\n"
        f"trtexec --onnx=model.onnx --saveEngine=model.plan --fp16 --minShapes={shapes(1)} "
        f"--optShapes={shapes(max_batch)} --maxShapes={shapes(max_batch)}\n"
    )


def _specs(
    backend: str, device: str, case: bool, max_batch: int, topk: int, delay: int, instances: int,
    threads: int | None, sys_path: list[str], image: tuple[int, int, int], gamma_size: int | None, dim: int,
) -> list[cfg.ModelSpec]:
    T = cfg.Tensor
    base = {"fsdeploy_sys_path": json.dumps(sys_path)}
    if threads:
        base["threads"] = str(threads)

    def py(name: str, inputs: tuple[cfg.Tensor, ...], outputs: tuple[cfg.Tensor, ...], batch: int = max_batch,
           dyn: int | None = delay, count: int = instances, **extra: str) -> cfg.ModelSpec:
        return cfg.ModelSpec(name, inputs, outputs, batch, "python", "cpu", count, dyn,
                             {**base, "fsdeploy_role": name, **extra})

    key = T("TASK_KEY", "STRING", (1,))
    pixels = T("PIXELS", "FP32", image)
    specs = [
        py("preprocess", (T("IMAGE", "STRING", (1,)),), (pixels,)),
        py("task_state", (T("TASK_ID", "STRING", (1,)),), (key,) + ((T("GAMMA", "FP32", (gamma_size,)),) if case else ())),
        py("head", (T("FEATURES", "FP32", (dim,)), key),
           (T("PROBS", "FP32", (-1,)), T("LABELS", "STRING", (-1,)), T("SCORES", "FP32", (-1,))), topk=str(topk)),
        py("adapt", (T("IMAGES", "STRING", (-1,)), T("LABELS", "STRING", (-1,)), T("TASK_ID", "STRING", (1,)),
                     T("HEAD", "STRING", (1,), True), T("TRANSFORM", "STRING", (1,), True),
                     T("HEAD_OPTS", "STRING", (1,), True), T("SEED", "INT64", (1,), True)),
           (T("INFO", "STRING", (1,)),), batch=0, dyn=None, count=1),
    ]
    if backend == "python":
        f_in = (pixels,) + ((T("GAMMA", "FP32", (gamma_size,)),) if case else (key,))
        specs.append(py("features", f_in, (T("FEATURES", "FP32", (dim,)),)))
        names = {"pixels": "PIXELS", "gamma": "GAMMA", "features": "FEATURES"}
    else:
        f_in = (T("images", "FP32", image),) + ((T("gamma", "FP32", (gamma_size,)),) if case else ())
        specs.append(cfg.ModelSpec("features", f_in, (T("features", "FP32", (dim,)),), max_batch, backend, device,
                                   instances, delay))
        names = {"pixels": "images", "gamma": "gamma", "features": "features"}
    outs = (T("LABELS", "STRING", (-1,)), T("SCORES", "FP32", (-1,)), T("PROBS", "FP32", (-1,)))
    for name, first in (("classify", T("IMAGE", "STRING", (1,))), ("classify_pixels", pixels)):
        steps = []
        if name == "classify":
            steps.append(cfg.step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "pixels"}))
        src = "pixels" if name == "classify" else "PIXELS"
        steps.append(cfg.step("task_state", {"TASK_ID": "TASK_ID"}, {"TASK_KEY": "task_key", **({"GAMMA": "gamma"} if case else {})}))
        f_map = {names["pixels"]: src}
        if case:
            f_map[names["gamma"]] = "gamma"
        elif backend == "python":
            f_map["TASK_KEY"] = "task_key"
        steps.append(cfg.step("features", f_map, {names["features"]: "features"}))
        steps.append(cfg.step("head", {"FEATURES": "features", "TASK_KEY": "task_key"},
                              {"PROBS": "PROBS", "LABELS": "LABELS", "SCORES": "SCORES"}))
        specs.append(cfg.ModelSpec(name, (first, T("TASK_ID", "STRING", (1,))), outs, max_batch, "ensemble",
                                   steps=tuple(steps)))
    return specs
