"""The Python API: `fsdeploy.export`, `fsdeploy.adapt`, `fsdeploy.predict`, the three steps of the CLI as functions.

Thin wrappers over `fsdeploy.pipeline.export.export_bundle`, `fsdeploy.runtime.adapt_task` and
`fsdeploy.runtime.predict_images`, with the CLI's defaults and checks (refused overwrites, head names and
options, the bundle's tuned engine choice, `device`), and nothing printed. Errors are `fsdeploy.errors`
exceptions with the same one-line messages the CLI shows.

    import fsdeploy

    bundle = fsdeploy.export("resnet18", "bundle/", checkpoint="weights.safetensors")
    task = fsdeploy.adapt(bundle, "support/", "task.npz", head="ncc")
    for p in fsdeploy.predict(bundle, task, ["query/"], topk=2):
        print(p.image, p.labels, p.probs)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsdeploy.bundle import Bundle
    from fsdeploy.pipeline.tune import Choice
    from fsdeploy.runtime import Prediction, TaskArtefact

PathLike = str | Path


def _bundle(bundle: Bundle | PathLike) -> Bundle:
    from fsdeploy.bundle import Bundle, load_bundle

    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def _choice(bundle: Bundle, backend: str | None, precision: str | None, threads: int | None, device: str | None) -> Choice:
    """The CLI's engine choice: explicit backend/precision, else the bundle's `fsdeploy tune` record, else ort fp32."""
    from fsdeploy.engines.devices import check_device
    from fsdeploy.pipeline.tune import resolve_choice

    choice = resolve_choice(bundle, backend, precision, threads=threads)
    if device is None:
        return choice
    check_device(choice.backend, device)
    return dataclasses.replace(choice, options=dataclasses.replace(choice.options, device=device))


def export(
    model: str,
    out: PathLike,
    *,
    adapter: str = "none",
    checkpoint: PathLike | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    opset: int = 17,
    validate: bool = True,
    calib: PathLike | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Export a timm backbone (+ adapter) to a bundle folder validated against PyTorch (`fsdeploy export`).

    Args:
        model: timm model name, e.g. "efficientnet_b0" or "resnet18".
        out: the bundle folder: a new path, or an existing bundle with `overwrite=True`; anything else is refused.
        checkpoint: local weights (.pth / .safetensors); without it and `pretrained` the weights are random (warned).

    Raises:
        InvalidInput: `out` holds other files, or a bundle without `overwrite`; bad options.
        ValidationFailed: ONNX Runtime disagrees with PyTorch beyond tolerance (nothing is written).
    """
    from fsdeploy.outputs import check_bundle_out
    from fsdeploy.pipeline.export import export_bundle

    check_bundle_out(Path(out), overwrite=overwrite)
    bundle, _ = export_bundle(model, out, adapter=adapter, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                              opset=opset, validate=validate, calib=calib, overwrite=overwrite)
    return bundle


def adapt(
    bundle: Bundle | PathLike,
    support: PathLike,
    out: PathLike | None = None,
    *,
    head: str = "linear",
    transform: str = "none",
    head_opts: dict[str, Any] | None = None,
    adapter: str | None = None,
    steps: int | None = None,
    backend: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    batch: int = 32,
    seed: int = 0,
    **fit_opts: Any,
) -> TaskArtefact:
    """Fit a per-task head (or a per-task fine-tuner) on a support folder and return the task (`fsdeploy adapt`).

    Args:
        bundle: a bundle folder or a loaded `Bundle`.
        support: one sub-folder of images per class.
        out: where to write the task artefact (.npz); None keeps it in memory only.
        head, transform, head_opts: as `--head`, `--transform`, `--head-opt` (`simpleshot` = ncc on cl2n).
        adapter: a per-task fine-tuner (`tsa`, `bn-affine`) instead of a head; `fit_opts` are its options
            (`domain=` for tsa, `optimizer=` for bn-affine).
        device: "cpu", "cuda", "cuda:N", "gpu[:N]" (OpenVINO); None: the backend's default.

    Raises:
        InvalidInput: a bad support folder, head, option or output path.
    """
    from fsdeploy.adapters import ADAPTERS
    from fsdeploy.commands.head_options import check_head_options, resolve_method
    from fsdeploy.errors import InvalidInput
    from fsdeploy.outputs import check_task_out
    from fsdeploy.runtime import adapt_task

    if out is not None:
        check_task_out(Path(out))
    b = _bundle(bundle)
    tuner = bool(adapter) and ADAPTERS.get(adapter).finetuner
    if tuner:
        if head != "linear" or transform != "none" or head_opts:
            raise InvalidInput(f"adapter {adapter!r} fits its own head on the folded features; drop head/transform/head_opts")
        opts: dict[str, Any] = {}
    else:
        head, transform = resolve_method(head, transform)
        opts = check_head_options(head, dict(head_opts or {}))
    choice = _choice(b, backend or ("ort" if tuner else None), precision, threads, device)
    task, _ = adapt_task(b, support, out, adapter=adapter, head=head, transform=transform, backend=choice.backend,
                         head_opts=opts, options=choice.options, batch=batch, seed=seed, steps=steps, fit_opts=fit_opts or None)
    return task


def predict(
    bundle: Bundle | PathLike,
    task: TaskArtefact | PathLike,
    images: PathLike | Sequence[PathLike],
    *,
    topk: int = 1,
    backend: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    batch: int = 32,
) -> list[Prediction]:
    """Classify image files or folders with a task; one `Prediction(image, labels, probs)` each (`fsdeploy predict`).

    Raises:
        BundleError: the task was fitted on another bundle.
        InvalidInput: `topk` above the task's classes, or an unreadable image (the error names it).
    """
    from fsdeploy.errors import InvalidInput
    from fsdeploy.runtime import TaskArtefact, predict_images

    b = _bundle(bundle)
    t = task if isinstance(task, TaskArtefact) else TaskArtefact.load(task)
    t.check_bundle(b)
    if not 1 <= topk <= len(t.classes):
        raise InvalidInput(f"topk {topk}: pass 1 to {len(t.classes)} (the task's classes)")
    paths = [images] if isinstance(images, (str, Path)) else list(images)
    folded = "graph" in t.task_state  # a task with its own folded graph runs it on ort fp32 unless told otherwise
    choice = _choice(b, backend or ("ort" if folded else None), precision, threads, device)
    return predict_images(b, t, paths, topk=topk, backend=choice.backend, options=choice.options, batch=batch)
