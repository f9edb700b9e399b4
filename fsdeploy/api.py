"""The Python API: `fsdeploy.export`, `fsdeploy.adapt`, `fsdeploy.predict`, the three steps of the CLI as functions,
and `fsdeploy.Adapter`, a session that adapts many tasks in one process with its engines kept warm.

Thin wrappers over `fsdeploy.pipeline.export.export_bundle`, `fsdeploy.runtime.adapt_task` and
`fsdeploy.runtime.predict_images`, with the CLI's defaults and checks (refused overwrites, head names and
options, the bundle's tuned engine choice, `device`), and nothing printed. Errors are `fsdeploy.errors`
exceptions with the same one-line messages the CLI shows.

    import fsdeploy

    bundle = fsdeploy.export("resnet18", "bundle/", checkpoint="weights.safetensors")
    task = fsdeploy.adapt(bundle, "support/", "task.npz", head="ncc")
    for p in fsdeploy.predict(bundle, task, ["query/"], topk=2):
        print(p.image, p.labels, p.probs)

    with fsdeploy.Adapter(bundle, head="ncc", keep_warm=True) as session:  # many tasks, engines opened once
        tasks = [session.adapt(folder) for folder in ("task1/", "task2/")]
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


class Adapter:
    """A session that adapts many tasks on one bundle with one method, keeping its engines open between them.

    What a device that learns task after task in one process (a robot, a camera) uses instead of calling
    `fsdeploy.adapt` per task: the engines open once, and with `keep_warm` their activation memory stays
    paged in, so the second and later tasks skip both costs. Every task equals what `fsdeploy.adapt` gives
    for the same folder and options.

        with fsdeploy.Adapter("bundle/", backend="openvino", keep_warm=True) as session:
            for folder in ("task1/", "task2/"):
                task = session.adapt(folder)
                preds = session.predict(task, ["query/"])

    Args:
        bundle, head, transform, head_opts, adapter, steps, backend, precision, device, threads, batch,
            fit_opts: as `fsdeploy.adapt`; fixed for the session.
        keep_warm: True keeps every engine of the support pass open with its activation memory between tasks
            (CaSE: the context graph, or the stage chain, the γ graph and the stage state buffers). That memory
            stays held between tasks and grows with the largest support set seen (CaSE efficientnet_b0 at 224 px,
            100 images: about 540 MiB on ORT, 550 MiB on OpenVINO); it saves 11% (ORT) to 20% (OpenVINO) of each
            later adapt's time (README, "Warm sessions"). False releases them after each task, as `fsdeploy
            adapt` does; only the query graph stays open. `close()` frees everything.
        support_size: the number of support images most of the session's tasks have (a fixed K-way N-shot
            set-up). On OpenVINO, CaSE bundles also compile their context graph for exactly that size and use it
            for such tasks: 7% faster per task, for one more compile when the session opens (0.3-0.55 s). None
            (default): every size runs the dynamic graph.

    Raises:
        InvalidInput: bad options (as `fsdeploy.adapt`), keep_warm not a bool, support_size not a count.
    """

    def __init__(
        self,
        bundle: Bundle | PathLike,
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
        keep_warm: bool = True,
        support_size: int | None = None,
        **fit_opts: Any,
    ) -> None:
        from fsdeploy.adapters import ADAPTERS
        from fsdeploy.commands.head_options import check_head_options, resolve_method
        from fsdeploy.errors import InvalidInput
        from fsdeploy.runtime import TaskAdapter

        if not isinstance(keep_warm, bool):
            raise InvalidInput(f"keep_warm={keep_warm!r}: pass True (engines stay open between tasks) or False (released after each)")
        self.bundle = b = _bundle(bundle)
        tuner = bool(adapter) and ADAPTERS.get(adapter).finetuner
        if tuner:
            if head != "linear" or transform != "none" or head_opts:
                raise InvalidInput(f"adapter {adapter!r} fits its own head on the folded features; drop head/transform/head_opts")
            opts: dict[str, Any] = {}
        else:
            head, transform = resolve_method(head, transform)
            opts = check_head_options(head, dict(head_opts or {}))
        self.choice = choice = _choice(b, backend or ("ort" if tuner else None), precision, threads, device)
        self.keep_warm = keep_warm
        self._session: TaskAdapter | None = TaskAdapter(
            b, adapter=adapter, head=head, transform=transform, head_opts=opts, backend=choice.backend,
            options=choice.options, steps=steps, fit_opts=fit_opts or None, batch=batch, keep_warm=keep_warm,
            support_size=support_size)

    def _open(self) -> Any:
        from fsdeploy.errors import InvalidInput

        if self._session is None:
            raise InvalidInput("this fsdeploy.Adapter is closed; open a new one (or use it inside its `with` block)")
        return self._session

    def adapt(self, support: PathLike, out: PathLike | None = None, *, seed: int = 0) -> TaskArtefact:
        """Fit one task on a support folder (one sub-folder of images per class); write it to `out` if given.

        Raises:
            InvalidInput: a bad support folder or output path; the session is closed.
        """
        from fsdeploy.outputs import check_task_out

        session = self._open()
        if out is not None:
            check_task_out(Path(out))
        task, _ = session.adapt_folder(support, out, seed=seed)
        return task

    def predict(self, task: TaskArtefact | PathLike, images: PathLike | Sequence[PathLike], *, topk: int = 1) -> list[Prediction]:
        """Classify image files or folders with a task on the session's engines (as `fsdeploy.predict`).

        Raises:
            BundleError: the task was fitted on another bundle.
            InvalidInput: `topk` above the task's classes, or an unreadable image (the error names it).
        """
        session = self._open()
        t = _task(self.bundle, task, topk)
        paths = [images] if isinstance(images, (str, Path)) else list(images)
        return session.predict_files(t, paths, topk=topk)

    def close(self) -> None:
        """Close every engine and free the memory the session holds; safe to call twice."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _task(bundle: Bundle, task: TaskArtefact | PathLike, topk: int) -> TaskArtefact:
    from fsdeploy.errors import InvalidInput
    from fsdeploy.runtime import TaskArtefact

    t = task if isinstance(task, TaskArtefact) else TaskArtefact.load(task)
    t.check_bundle(bundle)
    if not 1 <= topk <= len(t.classes):
        raise InvalidInput(f"topk {topk}: pass 1 to {len(t.classes)} (the task's classes)")
    return t


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

    One task, engines opened and released within the call; to adapt many tasks in one process, keep a
    `fsdeploy.Adapter` session instead.

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
    from fsdeploy.outputs import check_task_out

    if out is not None:
        check_task_out(Path(out))
    with Adapter(bundle, head=head, transform=transform, head_opts=head_opts, adapter=adapter, steps=steps, backend=backend,
                 precision=precision, device=device, threads=threads, batch=batch, keep_warm=False, **fit_opts) as session:
        return session.adapt(support, out, seed=seed)


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
    from fsdeploy.runtime import predict_images

    b = _bundle(bundle)
    t = _task(b, task, topk)
    paths = [images] if isinstance(images, (str, Path)) else list(images)
    folded = "graph" in t.task_state  # a task with its own folded graph runs it on ort fp32 unless told otherwise
    choice = _choice(b, backend or ("ort" if folded else None), precision, threads, device)
    return predict_images(b, t, paths, topk=topk, backend=choice.backend, options=choice.options, batch=batch)
