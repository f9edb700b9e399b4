"""One adaptation API: learn a task from support images, then classify with it, for every adapter kind.

`TaskAdapter` keeps a bundle's engines open across tasks (an episode loop, a server) and adapts the same
way whatever the kind: exported kinds (none, case, toast) run the bundle's feature path over the support
batches (streamed: CaSE's chunked context pass never holds the whole set) and fit a numpy head; per-task
fine-tuners (tsa, bn-affine) fit in PyTorch, fold, re-export and check (`fsdeploy.adapters.folded`). Either
way the result is one `TaskArtefact`, and prediction runs through the deployed path: the bundle's engines
with the task's state (γ), or the task's own folded graph.

`adapt_task` and `predict_images` are the file-level entry points the CLI calls.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fsdeploy import __version__
from fsdeploy.adapters import ADAPTERS, AdapterKind
from fsdeploy.bundle import Bundle
from fsdeploy.data.folders import list_images, scan_image_folder
from fsdeploy.data.images import iter_batches, load_checked, load_each
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import InvalidInput
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.runtime.paths import FeaturePath, feature_path
from fsdeploy.runtime.task import TaskArtefact, name_bad_images


@dataclass(frozen=True)
class AdaptTimings:
    """Wall time of each part of adapting one task, in milliseconds."""

    load_ms: float
    features_ms: float
    fit_ms: float
    write_ms: float

    @property
    def total_ms(self) -> float:
        return self.load_ms + self.features_ms + self.fit_ms + self.write_ms


@dataclass(frozen=True)
class Adapted:
    """One adapted task with the support features it was fitted on and the time each part took (ms)."""

    task: TaskArtefact
    feats: NDArray[np.float32]
    features_ms: float
    fit_ms: float


def _batches(images: np.ndarray | Iterable[np.ndarray], batch: int) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray):
        return (images[i : i + batch] for i in range(0, len(images), batch))
    return images


class TaskAdapter:
    """Adapt tasks on one bundle with one method, and predict with them.

    Args:
        adapter: a per-task fine-tuner kind (`tsa`, `bn-affine`), or None for the bundle's own kind.
        head, transform, head_opts: the numpy head of exported kinds (fine-tuners store their own head).
        backend, options: where the engines run (`options.precision` picks the graph variant).
        steps, fit_opts: fine-tuners' optimiser steps (None: the kind's published `default_steps`) and recipe options.
        batch: images per engine run.
        keep_warm: keep every engine of the bundle's feature path open, with its activation memory, from one task
            to the next (CaSE: the context graph, or the stage chain, the γ graph and the stage state buffers), so
            the second and later tasks skip opening them and page-faulting that memory in. It holds that memory
            between tasks, growing with the largest support set seen (CaSE efficientnet_b0 at 224 px, 100 images:
            about 540-550 MiB; README, "Warm sessions"). False (the one-shot `adapt_task` / `fsdeploy adapt`):
            each support-pass engine is released as soon as the pass no longer needs it.
        support_size: the number of support images most tasks of this adapter will have (a fixed K-way N-shot
            set-up). CaSE bundles on OpenVINO compile their one-batch context graph for exactly that size too, and
            run it for such tasks: 7% faster per task (efficientnet_b0, 100 images at 224 px), for one more compile
            when the engine opens (0.3-0.55 s), so it pays off in a warm session. Other sizes, bundles and
            backends run as without it.
    """

    def __init__(self, bundle: Bundle, *, adapter: str | None = None, head: str = "linear", transform: str = "none",
                 head_opts: dict[str, Any] | None = None, backend: str = "ort", options: EngineOptions | None = None,
                 steps: int | None = None, fit_opts: dict[str, Any] | None = None, batch: int = 32,
                 keep_warm: bool = False, support_size: int | None = None) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidInput(f"--batch must be >= 1 image per engine run, got {batch!r}")
        if not isinstance(keep_warm, bool):
            raise InvalidInput(f"keep_warm must be True or False, got {keep_warm!r}")
        if support_size is not None and (isinstance(support_size, bool) or not isinstance(support_size, int) or support_size < 1):
            raise InvalidInput(f"support_size={support_size!r}: pass the number of support images per task (>= 1), or None")
        self.keep_warm, self.support_size = keep_warm, support_size
        self.bundle = bundle
        self.kind: AdapterKind = ADAPTERS.get(adapter or bundle.manifest.adapter)
        if self.kind.finetuner:
            from fsdeploy.adapters.folded import check_bundle

            check_bundle(self.kind, bundle)
        elif adapter is not None and adapter != bundle.manifest.adapter:
            raise InvalidInput(
                f"--adapter {adapter} is exported into a bundle, not fitted per task; export with --adapter {adapter}, "
                f"or choose a per-task adapter ({', '.join(k.name for k in ADAPTERS.values() if k.finetuner)})"
            )
        self.head, self.transform, self.head_opts = head, transform, dict(head_opts or {})
        self.backend, self.options = backend, options or EngineOptions()
        self.steps = self.kind.resolve_steps(steps) if self.kind.finetuner else steps
        self.fit_opts, self.batch = dict(fit_opts or {}), batch
        self.kind.check_options(self.fit_opts)
        if not self.kind.finetuner:
            from fsdeploy.runtime.base_mean import transform_options

            self._transform_opts = transform_options(bundle, transform)  # SimpleShot's cl2n: the base-class mean
        if self.kind.finetuner and self.options.precision != "fp32":
            raise InvalidInput(f"tasks with folded weights ({self.kind.name}) run their own fp32 graph; drop --precision {self.options.precision}")
        self._path: FeaturePath | None = None
        self._images: np.ndarray | None = None  # the warm session's support-image buffer (`_buffer`)

    def support_path(self) -> FeaturePath:
        """The bundle's feature path, opened once and shared by every task of this adapter."""
        if self._path is None:
            self._path = feature_path(self.bundle, self.backend, self.options, keep_warm=self.keep_warm,
                                      support_size=self.support_size)
        return self._path

    def adapt(self, support: np.ndarray | Iterable[np.ndarray], labels: np.ndarray, classes: Sequence[str], *,
              seed: int = 0, info: dict[str, Any] | None = None, paths: Sequence[str | Path] = ()) -> Adapted:
        """Fit one task on preprocessed support images `(N, 3, H, W)` (an array, or batches of one).

        Args:
            paths: the support files, so a NaN/inf feature is reported by file name.

        Raises:
            InvalidInput: bad images or labels (NonFiniteFeatures names the files); ValidationFailed: a fold
                that disagrees with its network; BundleError: SimpleShot (cl2n) without a base-class mean.
        """
        m = self.bundle.manifest
        meta = {"support": int(len(labels)), "seed": seed, "precision": self.options.precision, "fsdeploy": __version__,
                **(info or {})}
        if self.kind.finetuner:
            from fsdeploy.adapters.folded import fit_folded

            images = support if isinstance(support, np.ndarray) else np.concatenate(list(support))
            t0 = time.perf_counter()
            folded = fit_folded(self.kind, self.bundle, images, np.asarray(labels), steps=self.steps, backend=self.backend,
                                fit_opts=self.fit_opts, paths=paths)
            total = (time.perf_counter() - t0) * 1e3
            head_name = {"ncc": "ncc-cosine"}.get(folded.head.head.name, folded.head.head.name)  # full-ft, maml: linear
            task = TaskArtefact(m.bundle_id, m.model, m.adapter, tuple(classes), folded.head.state(), folded.task_state,
                                {"head": head_name, **meta, **folded.info})
            return Adapted(task, folded.feats, total - folded.fit_ms, folded.fit_ms)
        t0 = time.perf_counter()
        feats, state = self.support_path().support(_batches(support, self.batch))
        t1 = time.perf_counter()
        model = TaskModel.create(self.head, self.transform, transform_opts=self._transform_opts, **self.head_opts)
        with name_bad_images(paths, "support"):
            model.fit(feats, labels, rng=np.random.default_rng(seed))
        t2 = time.perf_counter()
        task = TaskArtefact(m.bundle_id, m.model, m.adapter, tuple(classes), model.state(), state,
                            {"head": self.head, "transform": self.transform, **meta})
        return Adapted(task, feats, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def adapt_folder(self, support: str | Path, out: str | Path | None = None, *, seed: int = 0) -> tuple[TaskArtefact, AdaptTimings]:
        """Adapt to the task in the ImageFolder `support` and write the artefact to `out` (if given).

        Exported kinds stream the support images in batches of `batch` (decoded on `options.threads` threads),
        or decode the whole set into one batch where their feature path runs it as one (`support_batch`: CaSE's
        one-batch context graph on OpenVINO); fine-tuners load the set once (their PyTorch fit needs every image
        at each step).

        Raises:
            InvalidInput: missing/empty support folder, a class without images, one class, unreadable files.
        """
        t0 = time.perf_counter()
        files = scan_image_folder(support)
        workers = self.options.threads or os.cpu_count() or 1
        pre = self.bundle.manifest.preprocess
        n = len(files.paths)
        images: np.ndarray | Iterable[np.ndarray]
        if self.kind.finetuner:
            images = load_checked(files.paths, pre, workers=workers)
        elif (batch := self.support_path().support_batch(n, self.batch)) >= n:  # one batch (a warm session's buffer)
            images = [load_checked(files.paths, pre, workers=workers, out=self._buffer(n, pre))]
        else:
            images = iter_batches(files.paths, pre, batch, workers=workers)
        t1 = time.perf_counter()
        adapted = self.adapt(images, files.labels, files.classes, seed=seed, paths=files.paths)
        t3 = time.perf_counter()
        if out is not None:
            adapted.task.save(out)
        t4 = time.perf_counter()
        load_ms = (t1 - t0) * 1e3
        features_ms = (t3 - t1) * 1e3 - adapted.fit_ms  # batches streamed from disk decode inside the pass
        return adapted.task, AdaptTimings(load_ms, features_ms, adapted.fit_ms, (t4 - t3) * 1e3)

    def _buffer(self, n: int, pre: Any) -> np.ndarray | None:
        """A warm session's support-image buffer, grown to `n` images (None when not warm: a fresh array each time).
        Kept so its 0.6 MB per image at 224 px are paged in once, not for every task (10 ms per 100 images)."""
        if not self.keep_warm:
            return None
        if self._images is None or self._images.shape[0] < n or self._images.shape[1:] != tuple(pre.input_size):
            self._images = np.empty((n, *pre.input_size), dtype=np.float32)
        return self._images

    def query_path(self, task: TaskArtefact) -> FeaturePath:
        """The feature path queries of `task` run through (the caller closes it unless it is the shared one)."""
        task.check_bundle(self.bundle)
        if "graph" in task.task_state:
            return feature_path(self.bundle, self.backend, self.options, task_state=task.task_state)
        return self.support_path()

    def features(self, task: TaskArtefact, images: np.ndarray) -> NDArray[np.float32]:
        """Query features `(M, D)` of preprocessed images under the task's state."""
        path = self.query_path(task)
        try:
            return np.concatenate([path.query(b, task.task_state) for b in _batches(images, self.batch)])
        finally:
            if path is not self._path:
                path.close()

    def predict_proba(self, task: TaskArtefact, images: np.ndarray, paths: Sequence[str | Path] = ()) -> NDArray[np.float32]:
        """Class probabilities `(M, K)` of preprocessed images (`paths` name the files of NaN/inf features)."""
        feats = self.features(task, images)
        with name_bad_images(paths, "query"):
            return TaskModel.from_state(task.model_state).predict_proba(feats)

    def predict_files(self, task: TaskArtefact, images: Sequence[str | Path], *, topk: int = 1,
                      bad: list[tuple[str, str]] | None = None) -> list[Prediction]:
        """Classify image files (or folders of them) with `task` on this adapter's open engines (`predict_images`)."""
        path = self.query_path(task)
        try:
            return _classify(self.bundle, task, path, images, topk=topk, threads=self.options.threads, batch=self.batch, bad=bad)
        finally:
            if path is not self._path:
                path.close()

    def close(self) -> None:
        self._images = None
        if self._path is not None:
            self._path.close()
            self._path = None

    def __enter__(self) -> TaskAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adapt_task(
    bundle: Bundle,
    support: str | Path,
    out: str | Path | None,
    *,
    adapter: str | None = None,
    head: str = "linear",
    head_opts: dict[str, Any] | None = None,
    transform: str = "none",
    backend: str = "ort",
    options: EngineOptions | None = None,
    batch: int = 32,
    seed: int = 0,
    steps: int | None = None,
    fit_opts: dict[str, Any] | None = None,
) -> tuple[TaskArtefact, AdaptTimings]:
    """Adapt to the task in the ImageFolder `support` and write the artefact to `out` (if given): a one-shot
    `TaskAdapter.adapt_folder` whose engines are released as soon as the task no longer needs them.

    Raises:
        InvalidInput: missing/empty support folder, a class without images, one class, unreadable files.
    """
    t0 = time.perf_counter()
    with TaskAdapter(bundle, adapter=adapter, head=head, transform=transform, head_opts=head_opts, backend=backend,
                     options=options, steps=steps, fit_opts=fit_opts, batch=batch) as adapter_:
        t1 = time.perf_counter()
        task, t = adapter_.adapt_folder(support, out, seed=seed)
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    # a one-shot adapt pays for setting up and closing its engines: counted in load and features, as before
    return task, dataclasses.replace(t, load_ms=t.load_ms + (t1 - t0) * 1e3, features_ms=t.features_ms + (t3 - t2) * 1e3)


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image."""

    image: str
    labels: tuple[str, ...]
    probs: tuple[float, ...]


def predict_images(
    bundle: Bundle,
    task: TaskArtefact,
    images: Sequence[str | Path],
    *,
    topk: int = 1,
    backend: str = "ort",
    options: EngineOptions | None = None,
    batch: int = 32,
    bad: list[tuple[str, str]] | None = None,
) -> list[Prediction]:
    """Classify image files (or folders of them) with a stored task.

    Args:
        bad: when given, an unreadable image is recorded here as (path, reason) and the others are still
            classified; without it, one unreadable image refuses the run (one error naming them all).
    """
    task.check_bundle(bundle)
    options = options or EngineOptions()
    path = feature_path(bundle, backend, options, task_state=task.task_state)
    try:
        return _classify(bundle, task, path, images, topk=topk, threads=options.threads, batch=batch, bad=bad)
    finally:
        path.close()


def _classify(bundle: Bundle, task: TaskArtefact, path: FeaturePath, images: Sequence[str | Path], *, topk: int,
              threads: int | None, batch: int, bad: list[tuple[str, str]] | None) -> list[Prediction]:
    """`predict_images` on an open feature path (the caller closes it)."""
    paths = list_images(list(images))
    model = TaskModel.from_state(task.model_state)
    workers = threads or os.cpu_count() or 1
    out: list[Prediction] = []
    k = max(1, min(topk, len(task.classes)))
    # a transductive head (bd-cspn) uses the query batch's statistics: score every image of this call at once
    pending: list[tuple[list[str | Path], np.ndarray]] | None = [] if model.head.transductive else None
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        if bad is None:
            pixels = load_checked(chunk, bundle.manifest.preprocess, workers=workers)
        else:  # each file decoded once; the unreadable ones reported, the rest classified
            loaded = load_each(chunk, bundle.manifest.preprocess, workers=workers)
            bad += [(str(p), str(a)) for p, a in zip(chunk, loaded) if isinstance(a, InvalidInput)]
            chunk = [p for p, a in zip(chunk, loaded) if not isinstance(a, InvalidInput)]
            if not chunk:
                continue
            pixels = np.stack([a for a in loaded if not isinstance(a, InvalidInput)])
        feats = path.query(pixels, task.task_state)
        if pending is not None:
            pending.append((list(chunk), feats))
            continue
        with name_bad_images(chunk, "query"):
            probs = model.predict_proba(feats)
        out += _top_k(task, chunk, probs, k)
    if pending:
        chunk = [p for c, _ in pending for p in c]
        with name_bad_images(chunk, "query"):
            probs = model.predict_proba(np.concatenate([f for _, f in pending]))
        out += _top_k(task, chunk, probs, k)
    return out


def _top_k(task: TaskArtefact, chunk: Sequence[str | Path], probs: np.ndarray, k: int) -> list[Prediction]:
    order = np.argsort(-probs, axis=1)[:, :k]
    return [Prediction(str(p), tuple(task.classes[j] for j in idx), tuple(float(row[j]) for j in idx))
            for p, row, idx in zip(chunk, probs, order)]
