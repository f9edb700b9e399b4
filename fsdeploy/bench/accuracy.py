"""Few-shot accuracy through the deployed path: engine features, then numpy heads, per seeded episode.

Every method in one run sees the same episodes and the same engine features, so differences between
rows are differences between heads, not between samples.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fsdeploy.bench.stats import mean_ci95
from fsdeploy.data.episodes import Episode, sample_episode, sample_variable_episode
from fsdeploy.data.folders import LabelledFiles
from fsdeploy.data.images import load_checked
from fsdeploy.engines import EngineOptions
from fsdeploy.exporters.bundle import Bundle
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.runtime import feature_path


@dataclass(frozen=True)
class Method:
    """A head plus a feature transform, under a display label."""

    label: str
    head: str
    transform: str = "none"
    opts: dict[str, Any] = field(default_factory=dict)


DEFAULT_METHODS = (
    Method("NCC (ProtoNet)", "ncc"),
    Method("SimpleShot (CL2N+NCC)", "ncc", "cl2n"),
    Method("linear (UpperCaSE head)", "linear"),
)


@dataclass(frozen=True)
class AccuracyRow:
    """Accuracy over episodes (percent, 95% CI half-width) and median per-task times."""

    bundle: str
    method: str
    ways: int | str
    shots: int | str
    episodes: int
    accuracy: float
    ci95: float
    features_ms: float  # support context pass per task (median)
    fit_ms: float  # head fit per task (median)
    query_ms_per_image: float  # query features + head, per image (median)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ImageCache:
    """Decode and preprocess each dataset image at most once."""

    def __init__(self, data: LabelledFiles, bundle: Bundle) -> None:
        self.data = data
        self.cfg = bundle.manifest.preprocess
        self.cache: dict[int, np.ndarray] = {}

    def get(self, index: np.ndarray) -> np.ndarray:
        todo = [int(i) for i in index if int(i) not in self.cache]
        if todo:
            arrs = load_checked([self.data.paths[i] for i in todo], self.cfg)
            self.cache.update(zip(todo, arrs))
        return np.stack([self.cache[int(i)] for i in index])


def evaluate(
    bundle: Bundle,
    data: LabelledFiles,
    methods: Sequence[Method] = DEFAULT_METHODS,
    *,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 100,
    seed: int = 0,
    classes: np.ndarray | None = None,
    variable: bool = False,
    backend: str = "ort",
    options: EngineOptions | None = None,
    batch: int = 64,
    label: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[AccuracyRow]:
    """Mean accuracy ± 95% CI of each method on `episodes` seeded episodes drawn from `classes`.

    Args:
        variable: Meta-Dataset-style variable ways/shots instead of fixed `ways`/`shots`.
        progress: called with 1 after each episode.

    Raises:
        BundleError: a `cl2n` (SimpleShot) method on a bundle without a base-class mean.
    """
    from fsdeploy.base_mean import transform_options

    transform_opts = {m.label: transform_options(bundle, m.transform) for m in methods}  # cl2n: the base mean
    rng = np.random.default_rng(seed)
    images = _ImageCache(data, bundle)
    path = feature_path(bundle, backend, options)
    acc: dict[str, list[float]] = {m.label: [] for m in methods}
    fit_ms: dict[str, list[float]] = {m.label: [] for m in methods}
    head_ms: dict[str, list[float]] = {m.label: [] for m in methods}
    feat_ms: list[float] = []
    query_ms: list[float] = []
    try:
        for _ in range(episodes):
            ep: Episode = (
                sample_variable_episode(data.labels, rng, classes=classes)
                if variable
                else sample_episode(data.labels, ways, shots, queries, rng, classes=classes)
            )
            sup = images.get(ep.support)
            qry = images.get(ep.query)
            t0 = time.perf_counter()
            feats, state = path.support([sup[i : i + batch] for i in range(0, len(sup), batch)])
            t1 = time.perf_counter()
            qfeats = np.concatenate([path.query(qry[i : i + batch], state) for i in range(0, len(qry), batch)])
            t2 = time.perf_counter()
            feat_ms.append((t1 - t0) * 1e3)
            query_ms.append((t2 - t1) * 1e3 / len(qry))
            head_rng_seed = int(rng.integers(0, 2**31 - 1))
            for m in methods:
                model = TaskModel.create(m.head, m.transform, transform_opts=transform_opts[m.label], **m.opts)
                s = time.perf_counter()
                model.fit(feats, ep.support_labels, rng=np.random.default_rng(head_rng_seed))
                e = time.perf_counter()
                pred = np.argmax(model.predict_proba(qfeats), axis=1)
                f = time.perf_counter()
                fit_ms[m.label].append((e - s) * 1e3)
                head_ms[m.label].append((f - e) * 1e3 / len(qry))
                acc[m.label].append(float(np.mean(pred == ep.query_labels)) * 100.0)
            if progress:
                progress(1)
    finally:
        path.close()
    rows = []
    for m in methods:
        mean, half = mean_ci95(acc[m.label])
        rows.append(
            AccuracyRow(
                bundle=label or str(bundle.path.name),
                method=m.label,
                ways="var" if variable else ways,
                shots="var" if variable else shots,
                episodes=episodes,
                accuracy=mean,
                ci95=half,
                features_ms=float(np.median(feat_ms)),
                fit_ms=float(np.median(fit_ms[m.label])),
                query_ms_per_image=float(np.median(query_ms) + np.median(head_ms[m.label])),
            )
        )
    return rows
