"""Per-task adaptation on the device, and prediction with the stored task.

`adapt_task` runs the bundle's engines over a support folder, fits the numpy head, and writes a task
artefact (.npz) tied to the bundle by its id; `predict_images` refuses a task made for another bundle.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fsdeploy import __version__
from fsdeploy.atomic import atomic_path
from fsdeploy.data.folders import list_images, scan_image_folder
from fsdeploy.data.images import load_checked
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.exporters.bundle import Bundle
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.runtime import feature_path

TASK_SCHEMA = 1
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TaskArtefact:
    """What a device keeps per task: class names, the fitted head (+ transform), and task state (γ)."""

    bundle_id: str
    model: str
    adapter: str
    classes: tuple[str, ...]
    model_state: dict[str, np.ndarray]
    task_state: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write atomically as .npz (no pickles: strings and JSON only)."""
        arrays: dict[str, np.ndarray] = {
            "schema": np.asarray(TASK_SCHEMA),
            "bundle_id": np.asarray(self.bundle_id),
            "model": np.asarray(self.model),
            "adapter": np.asarray(self.adapter),
            "classes": np.asarray(self.classes, dtype=str),
            "info": np.asarray(json.dumps(self.info, sort_keys=True)),
        }
        arrays.update({f"head/{k}": np.asarray(v) for k, v in self.model_state.items()})
        arrays.update({f"task/{k}": np.asarray(v) for k, v in self.task_state.items()})
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TaskArtefact:
        """Read a task artefact; a file that is not one gives a clear error."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise InvalidInput(f"task artefact {path} does not exist; create it with `fsdeploy adapt`") from None
        except Exception as exc:
            raise BundleError(f"{path} is not a readable task artefact ({type(exc).__name__}); re-run `fsdeploy adapt`") from None
        try:
            schema = int(d["schema"])
        except (KeyError, TypeError, ValueError):
            schema = None
        if schema != TASK_SCHEMA:
            raise BundleError(f"{path} is not an fsdeploy task artefact of schema {TASK_SCHEMA}; re-run `fsdeploy adapt`")
        missing = [k for k in ("bundle_id", "model", "adapter", "classes", "info") if k not in d]
        if missing:
            raise BundleError(f"{path} is an incomplete task artefact (no {', '.join(missing)}); re-run `fsdeploy adapt`")
        try:
            info = json.loads(str(d["info"]))
        except ValueError:
            raise BundleError(f"{path} has an unreadable info record; re-run `fsdeploy adapt`") from None
        return cls(
            bundle_id=str(d["bundle_id"]),
            model=str(d["model"]),
            adapter=str(d["adapter"]),
            classes=tuple(str(c) for c in d["classes"]),
            model_state={k[5:]: v for k, v in d.items() if k.startswith("head/")},
            task_state={k[5:]: v for k, v in d.items() if k.startswith("task/")},
            info=info,
        )

    def check_bundle(self, bundle: Bundle, path: str | Path = "task") -> None:
        """Refuse a task fitted on a different bundle."""
        if self.bundle_id != bundle.manifest.bundle_id:
            raise BundleError(
                f"task {path} was fitted on a {self.model} ({self.adapter}) bundle with id {self.bundle_id[:12]}, "
                f"but {bundle.path} holds {bundle.manifest.model} ({bundle.manifest.adapter}) id "
                f"{bundle.manifest.bundle_id[:12]}; re-run `fsdeploy adapt` with this bundle"
            )


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


def _batches(images: NDArray[np.float32], batch: int) -> list[NDArray[np.float32]]:
    return [images[i : i + batch] for i in range(0, len(images), batch)]


def adapt_task(
    bundle: Bundle,
    support: str | Path,
    out: str | Path | None,
    *,
    head: str = "linear",
    head_opts: dict[str, Any] | None = None,
    transform: str = "none",
    backend: str = "ort",
    options: EngineOptions | None = None,
    batch: int = 32,
    seed: int = 0,
) -> tuple[TaskArtefact, AdaptTimings]:
    """Adapt to the task in the ImageFolder `support` and write the artefact to `out` (if given).

    Raises:
        InvalidInput: missing/empty support folder, a class without images, one class, unreadable files.
    """
    t0 = time.perf_counter()
    files = scan_image_folder(support)
    options = options or EngineOptions()
    images = load_checked(files.paths, bundle.manifest.preprocess, workers=options.threads or os.cpu_count() or 1)
    t1 = time.perf_counter()
    path = feature_path(bundle, backend, options)
    try:
        feats, state = path.support(_batches(images, batch))
    finally:
        path.close()
    t2 = time.perf_counter()
    model = TaskModel.create(head, transform, **(head_opts or {}))
    model.fit(feats, files.labels, rng=np.random.default_rng(seed))
    t3 = time.perf_counter()
    task = TaskArtefact(
        bundle_id=bundle.manifest.bundle_id,
        model=bundle.manifest.model,
        adapter=bundle.manifest.adapter,
        classes=files.classes,
        model_state=model.state(),
        task_state=state,
        info={"head": head, "transform": transform, "support": len(files), "seed": seed, "precision": options.precision,
              "fsdeploy": __version__},
    )
    if out is not None:
        task.save(out)
    t4 = time.perf_counter()
    ms = 1e3
    return task, AdaptTimings((t1 - t0) * ms, (t2 - t1) * ms, (t3 - t2) * ms, (t4 - t3) * ms)


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
) -> list[Prediction]:
    """Classify image files (or folders of them) with a stored task."""
    task.check_bundle(bundle)
    paths = list_images(list(images))
    model = TaskModel.from_state(task.model_state)
    options = options or EngineOptions()
    workers = options.threads or os.cpu_count() or 1
    path = feature_path(bundle, backend, options, task_state=task.task_state)
    out: list[Prediction] = []
    k = max(1, min(topk, len(task.classes)))
    try:
        for i in range(0, len(paths), batch):
            chunk = paths[i : i + batch]
            probs = model.predict_proba(path.query(load_checked(chunk, bundle.manifest.preprocess, workers=workers), task.task_state))
            order = np.argsort(-probs, axis=1)[:, :k]
            for p, row, idx in zip(chunk, probs, order):
                out.append(Prediction(str(p), tuple(task.classes[j] for j in idx), tuple(float(row[j]) for j in idx)))
    finally:
        path.close()
    return out
