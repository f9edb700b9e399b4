"""The measurements behind `fsdeploy.bench.perf`: each issue #8 comparison as a function returning rows.

Every function times the deployed side and its plain-PyTorch counterpart (`fsdeploy.bench.reference`)
interleaved in this process, and returns raw timings with their spread next to the ratio.

Threads: a side's thread count is a setting of that side. On a shared or busy machine a second OpenMP
thread can make PyTorch 10-40x slower (threads spin at barriers while other processes hold the cores), which
would inflate every ratio; so `pick_threads` gives each side the faster of 1 and N threads, probed on the
same model, and the tables record the choice. Head fits multiply small matrices (at most 128 x 1281 by
1281 x K): numpy's BLAS and both PyTorch head loops run on one thread.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.bench.latency import LatencyStats
from fsdeploy.bench.measure import interleaved, run_child
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import InvalidInput


@contextlib.contextmanager
def threads_for(torch_threads: int, blas_threads: int | None = None) -> Iterator[None]:
    """torch on `torch_threads` and numpy's BLAS on `blas_threads` (if given) for the duration."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    limits: Any = contextlib.nullcontext()
    if blas_threads is not None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: without it numpy keeps its BLAS default
            pass
        else:
            limits = threadpool_limits(limits=blas_threads)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(before)


def _median_ms(fn: Callable[[], Any], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def pick_threads(bundle: Any, images: np.ndarray, most: int, *, calls: int = 3) -> dict[str, int]:
    """{'ort': n, 'torch': n}: per side, the faster of 1 and `most` threads on `images` (one batch), median of `calls`."""
    import torch

    from fsdeploy.bench.reference import torch_features
    from fsdeploy.exporters.rebuild import torch_graphs
    from fsdeploy.runtime import feature_path

    candidates = sorted({1, most})
    if len(candidates) == 1:
        return {"ort": most, "torch": most}
    graphs = torch_graphs(bundle)
    x = torch.from_numpy(images)
    ort_ms, torch_ms = {}, {}
    for n in candidates:
        path = feature_path(bundle, "ort", EngineOptions(threads=n))
        try:
            state = path.support([images])[1]
            ort_ms[n] = _median_ms(lambda p=path, s=state: p.query(images, s), calls)
        finally:
            path.close()
        gamma = torch.from_numpy(state["gamma"]) if "gamma" in state else None
        with threads_for(n):
            torch_ms[n] = _median_ms(lambda g=gamma: torch_features(graphs, x, g), calls)
    return {"ort": min(ort_ms, key=ort_ms.get), "torch": min(torch_ms, key=torch_ms.get)}  # type: ignore[arg-type]


# ---- ceilings: the best ratio any engine doing the same multiply-accumulates could reach on this CPU


def fp32_peak_gmacs(threads: int, *, size: int = 1024, calls: int = 5) -> float:
    """This CPU's practical FP32 rate in GMAC/s: the best of `calls` square float32 matmuls of `size`
    through numpy's BLAS (hand-tuned kernels that run near the FMA peak) on `threads` threads."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    out = np.empty_like(a)
    best = float("inf")
    with threads_for(threads, threads):
        np.matmul(a, a, out=out)
        for _ in range(calls):
            start = time.perf_counter()
            np.matmul(a, a, out=out)
            best = min(best, time.perf_counter() - start)
    return size**3 / best / 1e9


def image_macs(bundle: Any) -> int:
    """MACs per image of the graph the query path runs, counted on its eager module (direct convolution)."""
    import torch

    from fsdeploy.bench.macs import count_macs
    from fsdeploy.exporters.rebuild import torch_graphs

    graphs = torch_graphs(bundle)
    x = torch.zeros(1, *bundle.manifest.preprocess.input_size)
    if "query" in graphs:
        gamma = torch.ones(bundle.manifest.case_layout().gamma_size)
        return count_macs(graphs["query"].eager, (x, gamma)).total
    return count_macs(graphs["features"].eager, x).total


def _spread(prefix: str, s: LatencyStats) -> dict[str, float]:
    return {f"{prefix}_mean_ms": s.mean, f"{prefix}_std_ms": s.std, f"{prefix}_p90_ms": s.p90, f"{prefix}_ips": s.throughput}


# ---- 1: query throughput


def query_throughput(
    bundle: Any, label: str, images: Sequence[Path], *, batches: Sequence[int], threads: dict[str, int],
    iters: int, rounds: int, precision: str = "fp32", ceiling: bool = False,
) -> list[dict[str, Any]]:
    """ORT (fsdeploy's query path: PIL/numpy preprocessing + engine) vs PyTorch eager (timm transform + module).

    Both timed calls decode and preprocess the same real image files, then compute features. `precision`
    int8 times the bundle's `fsdeploy quantize` graph on the ORT side (PyTorch stays FP32).

    With `ceiling`, fsdeploy's preprocessing alone is timed in the same rounds and each row also gets
    `pre_ms`, the batch's MACs (`gmacs`) and ONNX Runtime's rate after preprocessing (`ort_gmacs_s`): what
    `ceiling_columns` needs to bound the ratio at a measured peak (`fp32_peak_gmacs`).
    """
    import torch

    from fsdeploy.bench.reference import (
        load_images_torch,
        timm_transform,
        torch_features,
    )
    from fsdeploy.data.images import load_checked
    from fsdeploy.exporters.rebuild import torch_graphs
    from fsdeploy.runtime import feature_path

    pre = bundle.manifest.preprocess
    graphs, transform = torch_graphs(bundle), timm_transform(pre)
    path = feature_path(bundle, "ort", EngineOptions(threads=threads["ort"], precision=precision))
    macs = image_macs(bundle) if ceiling else 0
    rows = []
    try:
        state = path.support([load_checked(list(images[:8]), pre)])[1]
        gamma = torch.from_numpy(state["gamma"]) if "gamma" in state else None
        for b in batches:
            files = [images[i % len(images)] for i in range(b)]
            fns = {
                "ort": lambda files=files: path.query(load_checked(files, pre, workers=threads["ort"]), state),
                "torch": lambda files=files: torch_features(graphs, load_images_torch(files, transform), gamma),
            }
            if ceiling:
                fns["pre"] = lambda files=files: load_checked(files, pre, workers=threads["ort"])
            with threads_for(threads["torch"]):
                st = interleaved(fns, warmup=2, iters=iters, rounds=rounds, batch=b)
            row = {"model": label, "batch": b, "ort_threads": threads["ort"], "torch_threads": threads["torch"],
                   **_spread("ort", st["ort"]), **_spread("torch", st["torch"]),
                   "ratio": st["ort"].throughput / st["torch"].throughput}
            if ceiling:
                row.update(_compute_columns(st, b * macs))
            rows.append(row)
    finally:
        path.close()
    return rows


def _compute_columns(st: dict[str, LatencyStats], macs: int) -> dict[str, float]:
    """Preprocessing time, the batch's GMACs and ONNX Runtime's GMAC/s after preprocessing (mean times, as
    the ratio uses)."""
    return {"pre_ms": st["pre"].mean, "gmacs": macs / 1e9,
            "ort_gmacs_s": macs / 1e6 / max(st["ort"].mean - st["pre"].mean, 1e-9)}


def ceiling_columns(row: dict[str, Any], peak_gmacs: float) -> dict[str, float]:
    """An FP32 engine doing the row's MACs at `peak_gmacs` after the same preprocessing: its time
    (`floor_ms` = pre_ms + gmacs / peak) and the ratio it would reach over PyTorch (`ceiling`). A ratio
    target above the ceiling is out of reach for any engine computing the same products on this CPU."""
    floor_ms = row["pre_ms"] + row["gmacs"] / peak_gmacs * 1e3
    return {"peak_gmacs_s": peak_gmacs, "floor_ms": floor_ms, "ceiling": row["torch_mean_ms"] / floor_ms}


# ---- 2: head fit


def head_fit_ratio(n: int, dim: int, k: int, *, repeats: int, seed: int = 0) -> dict[str, Any]:
    """numpy `linear` head vs the PyTorch loop of the same recipe and draws, on synthetic non-negative
    features (the fit's cost does not depend on their values). Run inside `threads_for(1, 1)`."""
    from fsdeploy.bench.reference import linear_recipe, torch_linear_head
    from fsdeploy.heads import make_head

    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % k).astype(np.int64)
    feats = np.maximum(rng.standard_normal((k, dim))[labels] + rng.standard_normal((n, dim)), 0).astype(np.float32)
    head = make_head("linear")
    batches, lrs, decay = linear_recipe(n, seed + 1)
    fns = {
        "numpy": lambda: head.fit(feats, labels, rng=np.random.default_rng(seed + 1)),
        "torch": lambda: torch_linear_head(feats, labels, k, batches, lrs, weight_decay=decay),
        "floor": _numpy_floor(feats, k, len(batches), _mean_distinct(batches), decay),
    }
    st = interleaved(fns, warmup=1, iters=repeats, rounds=repeats)
    head.fit(feats, labels, rng=np.random.default_rng(seed + 1))
    lin = torch_linear_head(feats, labels, k, batches, lrs, weight_decay=decay)
    dw = float(np.abs(head.weight_ - lin.weight.detach().numpy()).max())  # type: ignore[attr-defined]
    db = float(np.abs(head.bias_ - lin.bias.detach().numpy()).max())  # type: ignore[attr-defined]
    return {"task": f"N={n} D={dim} K={k}", "numpy_median_ms": st["numpy"].median, "numpy_std_ms": st["numpy"].std,
            "torch_median_ms": st["torch"].median, "torch_std_ms": st["torch"].std,
            "ratio": st["torch"].median / st["numpy"].median, "max_abs_dweight": dw, "max_abs_dbias": db,
            "floor_ms": st["floor"].median, "ceiling": st["torch"].median / st["floor"].median}


def _mean_distinct(batches: np.ndarray) -> int:
    """Distinct rows per drawn batch, on average (rounded): what an exact step must at least touch."""
    return max(1, round(float(np.mean([np.unique(b).size for b in batches]))))


def _numpy_floor(feats: np.ndarray, k: int, steps: int, rows: int, weight_decay: float) -> Callable[[], None]:
    """What every step of any exact numpy fit must do, and nothing else: the two matrix products (logits of
    the `rows` distinct drawn rows, then the weight gradient) and the Adam update of the (K, D+1) weights,
    `steps` times. No softmax, no loss, no batch weights: `torch time / this` bounds what a numpy head gains."""
    from fsdeploy.heads import ops
    from fsdeploy.heads.linear import augment
    from fsdeploy.heads.optim import Adam

    x = augment(feats[:rows])
    theta = np.zeros((k, x.shape[1]), np.float32)
    logits = np.empty((rows, k), np.float32)
    grad = np.empty_like(theta)

    def run() -> None:
        opt = Adam(weight_decay=weight_decay)
        for _ in range(steps):
            ops.mm(x, theta.T, out=logits)
            ops.mm(logits.T, x, out=grad)
            opt.step({"theta": theta}, {"theta": grad}, 1e-3)

    return run


# ---- 3: one task end to end

DEPLOYED = "fsdeploy adapt (batch 32: chunked context)"
ONE_BATCH = "fsdeploy adapt --batch N (one context run)"
EAGER = "PyTorch eager"


def warm_side(name: str, support: int) -> str:
    """The row label of a warm session's tasks on engine `name`, set up for `support` images per task."""
    return f"fsdeploy.Adapter(keep_warm=True, support_size={support}) --backend {name} (2nd+ task)"


def engine_sides() -> dict[str, tuple[str, str]]:
    """Engines the adapt and memory targets run on here: side label -> (backend, precision)."""
    from fsdeploy.deps import available

    sides = {"ort": ("ort", "fp32")}
    if available("openvino"):
        sides["openvino"] = ("openvino", "default")  # bf16 on AMX / AVX512-BF16 CPUs, else f32
    return sides


def adapt_ratio(
    bundle: Any, support: Path, queries: Path, workdir: Path, *, threads: dict[str, int], repeats: int, seed: int = 0,
    warmup: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """adapt_task on ORT (the CLI's default batch 32, and one batch of every support image) and on every other
    engine installed here (batch 32): a fresh engine per task ("cold"); and per engine a warm session
    (`TaskAdapter(keep_warm=True, support_size=N)`, what `fsdeploy.Adapter` runs for a device whose tasks have N
    support images: OpenVINO also compiles the context graph for N) that adapted the `warmup` folder (another task,
    default `support`) before the timed ones ("warm"). Against the PyTorch eager recipe, whose model is built
    once and which also adapts `warmup` untimed first. All sides interleaved, `repeats` times. Plus, per engine
    and session, the share of `queries` its task and the eager task label the same, and whether each warm
    task equals the cold one (γ and head within 1e-6)."""
    from fsdeploy.bench.reference import timm_transform, torch_adapt, torch_predict
    from fsdeploy.data.folders import list_images, scan_image_folder
    from fsdeploy.exporters.rebuild import torch_graphs
    from fsdeploy.runtime import TaskAdapter, adapt_task, predict_images

    files = scan_image_folder(support)
    first = scan_image_folder(warmup or support)
    graphs, transform = torch_graphs(bundle), timm_transform(bundle.manifest.preprocess)
    engines = engine_sides()
    runs = [(DEPLOYED, "ort", 32), (ONE_BATCH, "ort", len(files))]
    runs += [(f"fsdeploy adapt --backend {name} (batch 32)", name, 32) for name in engines if name != "ort"]
    options = {name: EngineOptions(threads=threads["ort"], precision=precision) for name, (_, precision) in engines.items()}
    sessions = {name: TaskAdapter(bundle, head="linear", backend=backend, options=options[name], batch=32, keep_warm=True,
                                  support_size=len(files))
                for name, (backend, _) in engines.items()}
    warm_label = {name: warm_side(name, len(files)) for name in engines}
    parts: dict[str, list[tuple[float, float, float, float]]] = {
        **{side: [] for side, _, _ in runs}, **{warm_label[name]: [] for name in engines}, EAGER: []}
    tasks: dict[str, Any] = {}
    try:
        for name, session in sessions.items():  # each session's first task: opens its engines, pages their memory in
            session.adapt_folder(warmup or support, None, seed=seed)
        with threads_for(threads["torch"]):
            torch_adapt(graphs, list(first.paths), first.labels, transform, workdir / "task-warmup.pt", seed=seed, head_threads=1)
        for _ in range(repeats):
            for side, name, batch in runs:
                backend, _ = engines[name]
                task, t = adapt_task(bundle, support, workdir / f"task-{name}.npz", head="linear", backend=backend,
                                     options=options[name], batch=batch, seed=seed)
                if batch == 32:
                    tasks[name] = (task, backend, options[name])
                parts[side].append((t.load_ms, t.features_ms, t.fit_ms, t.write_ms))
            for name, session in sessions.items():
                task, t = session.adapt_folder(support, workdir / f"task-{name}-warm.npz", seed=seed)
                tasks[f"{name} warm"] = (task, engines[name][0], options[name])
                parts[warm_label[name]].append((t.load_ms, t.features_ms, t.fit_ms, t.write_ms))
            with threads_for(threads["torch"]):
                ref = torch_adapt(graphs, list(files.paths), files.labels, transform, workdir / "task.pt", seed=seed, head_threads=1)
            parts[EAGER].append((ref.load_ms, ref.features_ms, ref.fit_ms, ref.write_ms))
    finally:
        for session in sessions.values():
            session.close()
    query_paths = list_images([queries])
    with threads_for(threads["torch"]):
        eager = torch_predict(graphs, ref, query_paths, transform)
    agreement: dict[str, float] = {}
    for name, (task, backend, opts) in tasks.items():
        index = {c: i for i, c in enumerate(task.classes)}
        got = np.asarray([index[p.labels[0]] for p in predict_images(bundle, task, query_paths, backend=backend, options=opts)])
        agreement[name] = float(np.mean(got == eager))
    same_task = {name: _same_task(tasks[name][0], tasks[f"{name} warm"][0]) for name in engines}
    rows = []
    for side, values in parts.items():
        arr = np.asarray(values)
        med, total = np.median(arr, axis=0), arr.sum(axis=1)
        warm = side == EAGER or side in warm_label.values()
        row = {"side": side, "session": "warm" if warm else "cold", "threads": threads["torch" if side == EAGER else "ort"],
               "load_ms": med[0], "context_ms": med[1], "fit_ms": med[2], "write_ms": med[3],
               "total_median_ms": float(np.median(total)), "total_std_ms": float(np.std(total))}
        for name in engines:
            if side == warm_label[name]:
                row["equals_cold_task"] = same_task[name]
        rows.append(row)
    for r in rows:
        r["ratio"] = rows[-1]["total_median_ms"] / r["total_median_ms"]
    return rows, agreement


def _same_task(a: Any, b: Any, atol: float = 1e-6) -> bool:
    """Two tasks with the same classes, γ and head state (within `atol`)."""
    def close(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> bool:
        def equal(u: Any, v: Any) -> bool:
            u, v = np.asarray(u), np.asarray(v)
            if u.dtype.kind == "f" and v.dtype.kind == "f":
                return u.shape == v.shape and bool(np.allclose(u, v, rtol=0, atol=atol))
            return bool(np.array_equal(u, v))

        return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)

    return a.classes == b.classes and close(a.task_state, b.task_state) and close(a.model_state, b.model_state)


# ---- 4: memory and linearity


# A child process: one warm `fsdeploy.Adapter` session adapting the same folder twice (argv: bundle, folder,
# backend, precision, threads); its peak RSS is what a device that keeps its engines warm needs.
WARM_CHILD = """
import sys, fsdeploy
bundle, folder, backend, precision, threads = sys.argv[1:6]
with fsdeploy.Adapter(bundle, backend=backend, precision=precision, threads=int(threads), keep_warm=True) as session:
    for _ in range(2):
        session.adapt(folder)
"""


def memory_and_linearity(
    bundle: Any, folders: Sequence[Path], workdir: Path, *, threads: int, repeats: int = 1, warm: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Per support folder and engine installed here: peak RSS (VmHWM) and wall time of the `fsdeploy adapt`
    command; with `warm`, per engine also the peak RSS of a warm `fsdeploy.Adapter` session adapting the last
    (largest) folder twice; for ORT also the in-process time of `adapt_task` (median of `repeats`, interleaved
    over folders; process start-up excluded).

    Returns the rows and the R^2 of a straight line through (support size, in-process ORT adaptation time).
    """
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.runtime import adapt_task

    rows = []
    for name, (backend, precision) in engine_sides().items():
        for folder in folders:
            n = len(scan_image_folder(folder))
            argv = [sys.executable, "-m", "fsdeploy.cli", "adapt", str(bundle.path), str(folder), "--out",
                    str(workdir / f"task-{name}-{n}.npz"), "--threads", str(threads), "--backend", backend,
                    "--precision", precision]
            run = run_child(argv)
            if run.returncode != 0:
                raise InvalidInput(f"`fsdeploy adapt --backend {backend}` failed on {n} images (exit {run.returncode}): {run.output[-400:]}")
            rows.append({"backend": name, "support": n, "max_rss_mib": run.max_rss_mib, "cli_wall_s": run.wall_s})
        if warm:  # a warm session holds its engines' memory between tasks: its peak over two tasks of the largest set
            largest = folders[-1]
            n = len(scan_image_folder(largest))
            run = run_child([sys.executable, "-c", WARM_CHILD, str(bundle.path), str(largest), backend, precision, str(threads)])
            if run.returncode != 0:
                raise InvalidInput(f"a warm fsdeploy.Adapter session on {backend} failed on {n} images (exit {run.returncode}): "
                                   f"{run.output[-400:]}")
            rows.append({"backend": f"{name} (warm session, 2 tasks)", "support": n, "max_rss_mib": run.max_rss_mib,
                         "cli_wall_s": run.wall_s})
    folders_rows = [r for r in rows if r["backend"] == "ort"]
    times: dict[Path, list[float]] = {f: [] for f in folders}
    for _ in range(repeats):
        for folder in folders:
            _, t = adapt_task(bundle, folder, workdir / "task-inproc.npz", options=EngineOptions(threads=threads))
            times[folder].append(t.total_ms)
    for r, folder in zip(folders_rows, folders):
        r["adapt_ms"] = float(np.median(times[folder]))
        r["ms_per_image"] = r["adapt_ms"] / r["support"]
    sizes = np.asarray([r["support"] for r in folders_rows], dtype=np.float64)
    ms = np.asarray([r["adapt_ms"] for r in folders_rows])
    slope, intercept = np.polyfit(sizes, ms, 1)
    r2 = 1.0 - float(np.sum((ms - (slope * sizes + intercept)) ** 2) / max(np.sum((ms - ms.mean()) ** 2), 1e-12))
    for r in folders_rows:
        r["line_ms"] = float(slope * r["support"] + intercept)
    return rows, r2


# ---- 5: fast head solver


def newton_vs_adam(
    bundle: Any, data: Any, *, ways: int, shots: Sequence[int], queries: int, episodes: int, threads: int, seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy over the same seeded episodes of `linear` (Adam) and `linear-newton`, with their exact fit MACs."""
    from fsdeploy.bench.accuracy import Method, evaluate
    from fsdeploy.heads import make_head

    methods = (Method("linear", "linear"), Method("linear-newton", "linear-newton"))
    dim = bundle.manifest.feature_dim
    rows = []
    for k in shots:
        acc = evaluate(bundle, data, methods, ways=ways, shots=k, queries=queries, episodes=episodes, seed=seed + k,
                       options=EngineOptions(threads=threads))
        for r in acc:
            rows.append({"shots": k, "head": r.method, "accuracy": r.accuracy, "ci95": r.ci95, "episodes": r.episodes,
                         "fit_macs": make_head(r.method).fit_macs(ways * k, dim, ways), "fit_ms": r.fit_ms})
    return rows
