"""Measurements on the deployed path: engine latency with real-image preprocessing, FP32 against INT8
graphs, adaptation time per
method split into its parts, side-by-side timing of several callables, and a child process's peak memory.

Shared machines are noisy, so anything compared is timed interleaved in one process (round-robin
rounds), and the claims are the ratios (`fsdeploy.bench.latency.compare`).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from fsdeploy.bench.latency import LatencyStats, time_callable
from fsdeploy.data.images import load_checked
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import InvalidInput
from fsdeploy.bundle import Bundle
from fsdeploy.runtime import feature_path

# ---- real images on disk


def write_photo_folder(
    root: str | Path, *, classes: int, per_class: int, side: int = 320, seed: int = 0, quality: int = 90
) -> Path:
    """An ImageFolder of JPEG crops of the photographs shipped with matplotlib (`fsdeploy.data.samples`).

    Class j holds random square crops (30-100% of the shorter side, resized to `side` px) of photo
    j mod 3, so decoding and preprocessing cost what real camera images cost. Labels only name a task:
    use the glyph corpus where accuracy matters.
    """
    from fsdeploy.data.images import load_image
    from fsdeploy.data.samples import sample_photo_paths

    photos = [load_image(p) for p in sample_photo_paths()]
    if not photos:
        raise InvalidInput("matplotlib's sample photos are missing; pass a folder of your own images instead")
    rng = np.random.default_rng(seed)
    root = Path(root)
    for j in range(classes):
        folder = root / f"class_{j:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        img = photos[j % len(photos)]
        w, h = img.size
        for i in range(per_class):
            crop = int(min(w, h) * rng.uniform(0.3, 1.0))
            x0, y0 = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
            tile = img.crop((x0, y0, x0 + crop, y0 + crop)).resize((side, side), Image.Resampling.BILINEAR)
            tile.save(folder / f"{i:04d}.jpg", quality=quality)
    return root


# ---- side-by-side timing


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    iters: int | None = None,
    budget_s: float | None = None,
    rounds: int = 5,
    batch: int = 1,
) -> dict[str, LatencyStats]:
    """Time several callables round-robin, so slow phases of a shared machine hit each one alike.

    Each callable is warmed up `warmup` times, then gets `rounds` turns of `iters / rounds` timed calls
    (or `budget_s / rounds` seconds each). With neither `iters` nor `budget_s`, 30 calls each.
    """
    if rounds < 1:
        raise InvalidInput(f"rounds must be >= 1, got {rounds}")
    if iters is None and budget_s is None:
        iters = 30
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_iters = None if iters is None else max(1, -(-iters // rounds))
    per_budget = None if budget_s is None else budget_s / rounds
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            s = time_callable(fn, warmup=0, iters=per_iters, budget_s=per_budget, batch=batch)
            samples[name] += s.samples_ms
    return {name: LatencyStats(tuple(v), batch) for name, v in samples.items()}


# ---- engine latency on the deployed feature path


@dataclass(frozen=True)
class PathLatency:
    """Query latency of one backend at one batch, with the preprocessing of those images timed apart."""

    backend: str
    engine: LatencyStats
    preprocess: LatencyStats

    @property
    def batch(self) -> int:
        return self.engine.batch

    def row(self) -> dict[str, Any]:
        """latency_rows-style row plus preprocessing and end-to-end throughput (images/s)."""
        e2e = self.batch * 1000.0 / (self.engine.mean + self.preprocess.mean)
        return {"name": self.backend, **self.engine.summary(), "warning": self.engine.warning,
                "preprocess_ms": self.preprocess.mean, "end_to_end_ips": e2e}


def time_precisions(
    bundle: Bundle,
    image: NDArray[np.float32] | None = None,
    *,
    graph: str = "features",
    iters: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """Batch-1 latency (LatencyStats) of the fp32 and int8 graphs, interleaved so machine noise hits both alike.

    Args:
        image: one preprocessed image `(1, C, H, W)`; default a crop of a shipped photo.
    """
    from fsdeploy.data.samples import real_batch
    from fsdeploy.runtime import open_graph

    if image is None:
        image = real_batch(bundle.manifest.preprocess, 1, np.random.default_rng(0))
    if image.ndim != 4 or len(image) != 1:
        raise InvalidInput(f"time_precisions takes one image (1, C, H, W); got shape {image.shape}")
    if iters < 1:
        raise InvalidInput(f"--iters must be >= 1, got {iters}")
    input_name = next(iter(bundle.manifest.graphs[graph].inputs))
    feeds = {input_name: np.ascontiguousarray(image, dtype=np.float32)}
    engines = {p: open_graph(bundle, graph, "ort", EngineOptions(threads=threads, precision=p)) for p in ("fp32", "int8")}
    try:
        return interleaved({p: (lambda e=e: e.run(feeds)) for p, e in engines.items()}, warmup=3, iters=iters, rounds=min(5, iters))
    finally:
        for e in engines.values():
            e.close()


def _cycle(paths: Sequence[Path], n: int, start: int = 0) -> list[Path]:
    return [paths[(start + i) % len(paths)] for i in range(n)]


def backend_options(spec: str, options: EngineOptions | None) -> tuple[str, EngineOptions]:
    """`backend` or `backend:precision` (e.g. openvino:bf16, ort:int8) as a backend name and its options."""
    name, _, precision = spec.partition(":")
    base = options or EngineOptions()
    return name, replace(base, precision=precision) if precision else base


def path_latency(
    bundle: Bundle,
    images: Sequence[Path],
    *,
    backends: Sequence[str] = ("ort",),
    batches: Sequence[int] = (1, 8, 32),
    options: EngineOptions | None = None,
    warmup: int = 5,
    iters: int | None = None,
    budget_s: float | None = None,
    rounds: int = 5,
) -> list[PathLatency]:
    """Latency of the bundle's query feature path on each backend, interleaved, at each batch size.

    The query path is what serves a request after adaptation (CaSE: the query graph under a γ computed from
    a few of `images`). Preprocessing (decode + resize + crop + normalise of real files) is timed on its own
    for the same images, since it does not depend on the backend.
    """
    if not images:
        raise InvalidInput("no images to time; pass a folder of real images")
    pre = bundle.manifest.preprocess
    paths = {b: feature_path(bundle, *backend_options(b, options)) for b in backends}
    try:
        context = load_checked(_cycle(images, min(8, len(images))), pre)
        states = {b: p.support([context])[1] for b, p in paths.items()}
        out = []
        for batch in batches:
            files = _cycle(images, batch)
            arrays = load_checked(files, pre)
            fns = {b: (lambda p=p, s=states[b], x=arrays: p.query(x, s)) for b, p in paths.items()}
            fns["preprocess"] = lambda files=files: load_checked(files, pre)
            stats = interleaved(fns, warmup=warmup, iters=iters, budget_s=budget_s, rounds=rounds, batch=batch)
            out += [PathLatency(b, stats[b], stats["preprocess"]) for b in backends]
    finally:
        for p in paths.values():
            p.close()
    return out


# ---- adaptation time per method


@dataclass(frozen=True)
class AdaptRow:
    """Median wall time (ms) of each part of adapting one task with one method."""

    method: str
    backend: str
    support: int
    repeats: int
    load_ms: float
    features_ms: float  # engine pass over the support set (CaSE: the context pass, γ included)
    fit_ms: float  # head fit (fine-tuning methods: the PyTorch fit, fold and re-export)
    write_ms: float
    total_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def adaptation_times(
    bundle: Bundle,
    support: str | Path,
    methods: Sequence[tuple[str, str, str, dict[str, Any]]],
    *,
    backend: str = "ort",
    options: EngineOptions | None = None,
    repeats: int = 3,
    batch: int = 32,
    steps: int | None = None,
) -> list[AdaptRow]:
    """Adapt to the task in `support` with each method `repeats` times (interleaved); median of each part.

    Args:
        methods: (key, head, transform, head options) per method; keys of per-task fine-tuners (tsa,
            bn-affine) adapt through their kind (PyTorch fit, fold, re-export) instead of a head.
        steps: fine-tuning steps for every fine-tuner; None: each cost-table method's own (`maml-100` runs 100
            steps, not its kind's default 10), as the accuracy loop does.

    A fine-tuner whose fit diverges on this task (`FitDiverged`) has no time: it gets no row.
    """
    from fsdeploy.errors import FitDiverged
    from fsdeploy.adapters import finetuner_methods
    from fsdeploy.runtime import adapt_task

    from fsdeploy.bench.costs import DEFAULT_METHODS

    tuners = {key: kind for key, (kind, _) in finetuner_methods().items()}
    fit_opts = {key: opts for key, (_, opts) in finetuner_methods().items()}
    own_steps = {m.key: m.steps for m in DEFAULT_METHODS if m.key in tuners}

    parts: dict[str, list[tuple[float, float, float, float]]] = {m[0]: [] for m in methods}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "task.npz"
        for _ in range(repeats):
            for key, head, transform, opts in methods:
                try:
                    task, t = adapt_task(bundle, support, out, adapter=tuners.get(key), head=head, transform=transform,
                                         head_opts=opts, backend=backend, options=options, batch=batch,
                                         steps=steps if steps is not None else own_steps.get(key),
                                         fit_opts=fit_opts.get(key))
                except FitDiverged:
                    continue
                n = int(task.info["support"])
                parts[key].append((t.load_ms, t.features_ms, t.fit_ms, t.write_ms))
    rows = []
    for key, _, _, _ in methods:
        if not parts[key]:
            continue
        med = np.median(np.asarray(parts[key]), axis=0)
        rows.append(AdaptRow(key, backend, n, repeats,
                             *map(float, med), float(med.sum())))
    return rows


# ---- peak memory of a child process


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit status, wall time, peak resident memory and its output."""

    returncode: int
    wall_s: float
    max_rss_mib: float
    output: str


def _peak_rss_kib(pid: int) -> int | None:
    """VmHWM of a live process, in KiB (None once it is gone or without /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_child(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 3600, poll_s: float = 0.01
) -> ChildRun:
    """Run `argv` and return its peak resident memory: the high-water mark of its own address space.

    Why not `ru_maxrss` (wait4 / RUSAGE_CHILDREN): Linux carries the parent's resident size into the child's
    maxrss across fork/vfork + exec, so a child of a 1 GiB benchmark process would report >= 1 GiB even for
    `python -c pass`. VmHWM in /proc/<pid>/status belongs to the exec'd program's own memory map; it is read
    every `poll_s` seconds until the child exits (a peak reached in its last `poll_s` would be missed).
    Without /proc the figure falls back to ru_maxrss, which overstates as described.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = start + timeout_s
        peak = 0
        seen = False
        while True:
            hwm = _peak_rss_kib(proc.pid)
            if hwm is not None:
                seen, peak = True, max(peak, hwm)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(poll_s)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        kib = peak if seen else usage.ru_maxrss
        return ChildRun(proc.returncode, wall, kib / 1024.0, log.read())
