"""Few-shot accuracy through the deployed path, per seeded episode: the one episode loop of fsdeploy.

Every method in one run sees the same episodes (paired rows). Head methods share the episode's engine
features (the bundle's feature path: CaSE's context pass gives γ per episode), so their differences are
differences between heads. Per-task fine-tuners (`Method(adapter="tsa")`, `"bn-affine"`) adapt each
episode through `fsdeploy.runtime.TaskAdapter`: fit, fold, re-export, and the queries run through the
folded graph on the engine, exactly as `fsdeploy adapt` and `predict` deploy them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fsdeploy.bench.stats import mean_ci95
from fsdeploy.errors import FitDiverged
from fsdeploy.data.episodes import Episode, sample_episode, sample_variable_episode
from fsdeploy.data.folders import LabelledFiles
from fsdeploy.data.cache import ImageCache
from fsdeploy.engines import EngineOptions
from fsdeploy.bundle import Bundle
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.runtime import TaskAdapter


@dataclass(frozen=True)
class Method:
    """A head plus a feature transform, under a display label; or a per-task fine-tuner (`adapter`).

    Attributes:
        adapter: a per-task fine-tuner kind (tsa, bn-affine); it stores its own head, `head` is ignored.
        steps: the fine-tuner's optimiser steps (None: the kind's published `default_steps`).
    """

    label: str
    head: str = "linear"
    transform: str = "none"
    opts: dict[str, Any] = field(default_factory=dict)
    adapter: str = ""
    steps: int | None = None


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
    diverged: int = 0  # episodes whose per-task fit diverged (scored at chance, 100/ways %)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


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
    per_episode: dict[str, list[float]] | None = None,
) -> list[AccuracyRow]:
    """Mean accuracy ± 95% CI of each method on `episodes` seeded episodes drawn from `classes`.

    Args:
        variable: Meta-Dataset-style variable ways/shots instead of fixed `ways`/`shots`.
        progress: called with 1 after each episode.
        per_episode: filled with each method's accuracy (percent) per episode, by label, for paired
            differences between rows of one run (the episodes are the same for every method).

    Raises:
        BundleError: a `cl2n` (SimpleShot) method on a bundle without a base-class mean.
    """
    from fsdeploy.runtime.base_mean import transform_options

    transform_opts = {m.label: transform_options(bundle, m.transform) for m in methods if not m.adapter}  # cl2n: the base mean
    rng = np.random.default_rng(seed)
    images = ImageCache(data.paths, bundle.manifest.preprocess)
    heads = [m for m in methods if not m.adapter]
    tuners = {m.label: TaskAdapter(bundle, adapter=m.adapter, backend=backend, options=options, steps=m.steps,
                                   fit_opts=dict(m.opts), batch=batch) for m in methods if m.adapter}
    shared = TaskAdapter(bundle, backend=backend, options=options, batch=batch, keep_warm=True)  # one task per episode
    acc: dict[str, list[float]] = {m.label: [] for m in methods}
    fit_ms: dict[str, list[float]] = {m.label: [] for m in methods}
    head_ms: dict[str, list[float]] = {m.label: [] for m in methods}
    feat_ms: dict[str, list[float]] = {m.label: [] for m in methods}
    query_ms: dict[str, list[float]] = {m.label: [] for m in methods}
    diverged: dict[str, int] = {m.label: 0 for m in methods}
    try:
        for _ in range(episodes):
            ep: Episode = (
                sample_variable_episode(data.labels, rng, classes=classes)
                if variable
                else sample_episode(data.labels, ways, shots, queries, rng, classes=classes)
            )
            sup = images.get(ep.support)
            qry = images.get(ep.query)
            head_rng_seed = int(rng.integers(0, 2**31 - 1))
            names = [str(c) for c in range(int(ep.support_labels.max()) + 1)]
            if heads:
                t0 = time.perf_counter()
                path = shared.support_path()
                feats, state = path.support([sup[i : i + batch] for i in range(0, len(sup), batch)])
                t1 = time.perf_counter()
                qfeats = np.concatenate([path.query(qry[i : i + batch], state) for i in range(0, len(qry), batch)])
                t2 = time.perf_counter()
                for m in heads:
                    model = TaskModel.create(m.head, m.transform, transform_opts=transform_opts[m.label], **m.opts)
                    s = time.perf_counter()
                    model.fit(feats, ep.support_labels, rng=np.random.default_rng(head_rng_seed))
                    e = time.perf_counter()
                    pred = np.argmax(model.predict_proba(qfeats), axis=1)
                    f = time.perf_counter()
                    feat_ms[m.label].append((t1 - t0) * 1e3)
                    query_ms[m.label].append((t2 - t1) * 1e3 / len(qry))
                    fit_ms[m.label].append((e - s) * 1e3)
                    head_ms[m.label].append((f - e) * 1e3 / len(qry))
                    acc[m.label].append(float(np.mean(pred == ep.query_labels)) * 100.0)
            for name, tuner in tuners.items():
                try:
                    adapted = tuner.adapt(sup, ep.support_labels, names, seed=head_rng_seed,
                                          paths=[data.paths[i] for i in ep.support])
                except FitDiverged:  # a deployed adapt fails on this task: no classifier, so a guess
                    diverged[name] += 1
                    acc[name].append(100.0 / len(names))
                    continue
                s = time.perf_counter()
                probs = tuner.predict_proba(adapted.task, qry)
                e = time.perf_counter()
                feat_ms[name].append(adapted.features_ms)
                fit_ms[name].append(adapted.fit_ms)
                query_ms[name].append((e - s) * 1e3 / len(qry))
                head_ms[name].append(0.0)
                acc[name].append(float(np.mean(np.argmax(probs, axis=1) == ep.query_labels)) * 100.0)
            if progress:
                progress(1)
    finally:
        shared.close()
        for tuner in tuners.values():
            tuner.close()
    if per_episode is not None:
        per_episode.update({label: list(values) for label, values in acc.items()})
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
                features_ms=_median(feat_ms[m.label]),
                fit_ms=_median(fit_ms[m.label]),
                query_ms_per_image=_median(query_ms[m.label]) + _median(head_ms[m.label]),
                diverged=diverged[m.label],
            )
        )
    return rows
