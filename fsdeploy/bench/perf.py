"""Issue #8's speed and memory targets, each measured side by side in one process and reported as a ratio.

Targets (2-core CPU, the embedded default):
1. query inference: ONNX Runtime >= 2.5x PyTorch eager throughput at batch 1 and 16 for resnet18,
   efficientnet_b0 and CaSE efficientnet_b0 at 224 px, decoding + preprocessing real image files inside
   the timed call on both sides (fsdeploy's PIL/numpy path vs timm's torchvision transform);
2. UpperCaSE head fit: numpy `linear` >= 10x a plain PyTorch loop of the same recipe fed the same batch
   draws, weights within 1e-5;
3. one task end to end (CaSE efficientnet_b0, 224 px, 100 support images, 10 ways: load, context pass +
   γ, head fit, artefact write): `fsdeploy.runtime.adapt_task` >= 4x the same recipe in PyTorch eager (issue #8),
   and a warm session (`fsdeploy.Adapter(keep_warm=True, support_size=N)`, its 2nd+ task) on the fastest engine
   >= 6x (issue #21),
   with >= 99% prediction agreement on held-out queries;
4. memory: peak RSS of the `fsdeploy adapt` command on 500 support images at 224 px <= 2 GiB, and
   adaptation time linear in the support size (50 / 100 / 200 / 500);
5. `linear-newton` reaches the 500-step Adam head's accuracy (within its 95% CI) with >= 10x fewer head MACs.

Shared machines are noisy: both sides of a ratio are timed interleaved (round-robin) in one process, and the
ratios, with raw timings and spreads beside them, are the claims.

Ceilings: target 1 rows also give the ratio an FP32 engine would reach doing the model's MACs at the fastest
float32 matmul seen in the run after the same preprocessing, and target 2 rows the ratio of a numpy fit that does
only each step's two products and Adam update; a target above its ceiling is out of reach on this machine.

Threads: each side gets the faster of 1 and `threads` threads, probed per model (see
`fsdeploy.bench.perf_measures`); head fits run on one thread on both sides.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fsdeploy.bench import perf_measures as pm
from fsdeploy.bench.workspace import Weights, glyph_corpus, photo_folder, pick_weights, prepare_bundle, split_classes
from fsdeploy.errors import InvalidInput

Say = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    number: int
    name: str
    claim: str
    threshold: float


TARGETS: dict[int, Target] = {t.number: t for t in (
    Target(1, "query inference", "ORT >= 2.5x PyTorch eager img/s, batch 1 and 16, preprocessing included", 2.5),
    Target(2, "head fit", "numpy linear head >= 10x a PyTorch loop, same draws, weights within 1e-5", 10.0),
    Target(3, "adapt one task", "adapt_task >= 4x PyTorch eager UpperCaSE on ORT (issue #8), >= 6x on the fastest "
                                "engine in a warm session (issue #21; eager's model built and warm too), >= 99% same "
                                "predictions", 4.0),
    Target(4, "memory", "fsdeploy adapt peak RSS <= 2 GiB at 500 images on every engine, one-shot and warm session; "
                        "time linear in N", 2048.0),
    Target(5, "fast head solver", "linear-newton within linear's 95% CI with >= 10x fewer head MACs", 10.0),
    Target(6, "engine peers", "fsdeploy's chosen engine (the fastest of ORT FP32, OpenVINO default and bf16-mixed that keeps "
                              ">= 99% of FP32's decisions on novel glyph episodes of its model) >= 4x PyTorch eager FP32 on "
                              "model time, and >= the best peer (+ bf16 autocast channels_last) in img/s, preprocessing "
                              "included", 4.0),
)}
FASTEST_ADAPT = 6.0  # issue #21's adapt target for the fastest engine
AGREEMENT = 0.99
WEIGHT_ATOL = 1e-5
LINEAR_R2 = 0.98


@dataclass(frozen=True)
class PerfConfig:
    """What `run_perf` measures; `quick_config()` is the few-minutes variant of the same targets."""

    workdir: Path
    targets: tuple[int, ...] = (1, 2, 3, 4, 5)
    threads: int = 2  # most threads a side may use; each side gets the faster of 1 and this
    img_size: int = 224
    models: tuple[str, ...] = ("resnet18", "efficientnet_b0")
    case_model: str = "efficientnet_b0"
    batches: tuple[int, ...] = (1, 16)
    int8: bool = True  # also time `fsdeploy quantize` graphs of the plain models (reported beside target 1)
    iters: int = 24  # timed calls per side and batch (target 1), split over `rounds`
    rounds: int = 4
    # (N, D, K): 5-way 1/2/5-shot, 10-way 5/10-shot; D = efficientnet_b0's feature width
    head_tasks: tuple[tuple[int, int, int], ...] = ((5, 1280, 5), (10, 1280, 5), (25, 1280, 5), (50, 1280, 10), (100, 1280, 10))
    head_repeats: int = 6
    support: int = 100
    ways: int = 10
    queries: int = 50
    adapt_repeats: int = 3
    memory_sizes: tuple[int, ...] = (50, 100, 200, 500)
    data: Path | None = None  # glyph corpus for target 5 (default: render a slice into workdir)
    split: str = "novel"
    accuracy_shots: tuple[int, ...] = (1, 5)
    accuracy_ways: int = 5
    accuracy_queries: int = 5  # per class: every glyph class has >= 10 instances
    episodes: int = 600
    checkpoint: Path | None = None  # efficientnet_b0 weights (default: the shipped checkpoint)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, workdir: Path, **overrides: Any) -> PerfConfig:
        """Same targets, fewer repeats and episodes, support sizes up to 200: a few minutes on 2 cores."""
        base = dict(iters=8, rounds=2, head_repeats=3, adapt_repeats=1, memory_sizes=(50, 100, 200),
                    episodes=100, accuracy_shots=(5,), quick=True)
        return cls(workdir=workdir, **{**base, **overrides})


@dataclass
class TargetResult:
    """One row of the status table."""

    number: int
    name: str
    claim: str
    measured: str
    ratio: float | None
    status: str  # met | NOT met | partial: <why> (<status on what ran>)


@dataclass
class PerfReport:
    config: dict[str, Any]
    results: list[TargetResult] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "results": [asdict(r) for r in self.results], "tables": self.tables,
                "notes": self.notes}


# ---- the whole run


class _Run:
    """Shared state of one run: the report, bundles made on demand, each model's probed thread counts."""

    def __init__(self, cfg: PerfConfig, say: Say) -> None:
        self.cfg, self.say = cfg, say
        self.report = PerfReport(config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
        self.weights: dict[str, Weights] = {}
        self.threads_by_bundle: dict[str, dict[str, int]] = {}

    def bundle(self, model: str, adapter: str = "none", size: int | None = None) -> Any:
        cfg = self.cfg
        size = size or cfg.img_size
        key = f"{model}-{adapter}@{size}"  # a case bundle may get other weights (the shipped meta-trained CaSE)
        if key not in self.weights:
            self.weights[key] = pick_weights(model, cfg.workdir, size, cfg.checkpoint if model == cfg.case_model else None,
                                             adapter=adapter)
            self.report.notes.append(f"{model} ({adapter}) at {size} px: {self.weights[key].description}")
        return prepare_bundle(cfg.workdir, model, adapter=adapter, img_size=size, weights=self.weights[key], say=self.say)

    def photos(self) -> list[Path]:
        return sorted(photo_folder(self.cfg.workdir, "photos", classes=3, per_class=8, seed=self.cfg.seed).rglob("*.jpg"))

    def threads(self, bundle: Any) -> dict[str, int]:
        """Per side, the faster of 1 and cfg.threads threads on this bundle (probed once, at batch 4)."""
        key = str(bundle.path)
        if key not in self.threads_by_bundle:
            from fsdeploy.data.images import load_checked

            images = load_checked(self.photos()[:4], bundle.manifest.preprocess)
            self.threads_by_bundle[key] = pm.pick_threads(bundle, images, self.cfg.threads)
            self.report.notes.append(f"threads for {bundle.path.name}: {self.threads_by_bundle[key]} (faster of 1 and {self.cfg.threads})")
        return self.threads_by_bundle[key]

    def support_folder(self, n: int) -> Path:
        per = max(1, n // self.cfg.ways)
        return photo_folder(self.cfg.workdir, f"support-{self.cfg.ways}x{per}", classes=self.cfg.ways, per_class=per,
                            seed=self.cfg.seed + 7)


def run_perf(cfg: PerfConfig, say: Say = print) -> PerfReport:
    """Measure every target in `cfg.targets`, each with its tables and a status row."""
    unknown = sorted(set(cfg.targets) - set(TARGETS))
    if unknown:
        raise InvalidInput(f"unknown perf targets {unknown}; choose from {sorted(TARGETS)}")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, say)
    run.report.notes.append(f"load average at start: {_load()}")
    with pm.threads_for(cfg.threads, 1):  # heads fit on one BLAS thread, on both sides (see perf_measures)
        for number in cfg.targets:
            say(f"target {number}: {TARGETS[number].name}")
            run.report.results.append(_RUNNERS[number](run))
    run.report.notes.append(f"load average at end: {_load()}")
    return run.report


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


def _status(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _result(number: int, measured: str, ratio: float | None, status: str) -> TargetResult:
    t = TARGETS[number]
    return TargetResult(number, t.name, t.claim, measured, ratio, status)


def _run_1(run: _Run) -> TargetResult:
    cfg, images = run.cfg, run.photos()
    bundles = {m: run.bundle(m) for m in cfg.models}
    bundles[f"CaSE {cfg.case_model}"] = run.bundle(cfg.case_model, "case")
    # the machine's clock wanders by 20-30% within minutes: the peak is the fastest matmul seen before each
    # model and at the end, so a ceiling is never lowered by a slow moment
    peaks, rows = [], []
    for label, b in bundles.items():
        peaks.append(pm.fp32_peak_gmacs(cfg.threads))
        rows += pm.query_throughput(b, label, images, batches=cfg.batches, threads=run.threads(b), iters=cfg.iters,
                                    rounds=cfg.rounds, ceiling=True)
    peak = max(*peaks, pm.fp32_peak_gmacs(cfg.threads))
    for r in rows:
        r.update(pm.ceiling_columns(r, peak))
    run.report.notes.append(f"FP32 peak for target 1's ceilings: {peak:.1f} GMAC/s (fastest 1024^3 float32 matmul "
                            f"seen in the run, {cfg.threads} threads)")
    run.report.tables["1: query throughput, ORT vs PyTorch eager (decode + preprocess + features)"] = rows
    worst = min(rows, key=lambda r: r["ratio"])
    capped = [r for r in rows if r["ceiling"] < TARGETS[1].threshold]
    measured = f"FP32 min {worst['ratio']:.2f}x ({worst['model']}, batch {worst['batch']})"
    if capped:
        measured += "; out of reach at the FP32 peak: " + ", ".join(
            f"{r['model']} batch {r['batch']} (ceiling {r['ceiling']:.2f}x)" for r in capped)
    if cfg.int8:  # the closest real thing where FP32 is at the FMA peak: static INT8 (not the same numerics)
        from fsdeploy.bundle import load_bundle
        from fsdeploy.pipeline.quantize import quantize_bundle

        int8_rows = []
        for model in cfg.models:
            report = quantize_bundle(bundles[model], [run.support_folder(cfg.support)], say=run.say)
            b = load_bundle(bundles[model].path)  # the manifest now lists the int8 graph
            run.report.notes.append(f"{model} INT8: cosine vs FP32 min {report.cosine_min:.4f} / mean "
                                    f"{report.cosine_mean:.4f} on {report.validation_images} held-out images")
            int8_rows += pm.query_throughput(b, f"{model} INT8", images, batches=cfg.batches, threads=run.threads(b),
                                             iters=cfg.iters, rounds=cfg.rounds, precision="int8")
        run.report.tables["1b: query throughput, ORT INT8 (fsdeploy quantize) vs PyTorch eager FP32"] = int8_rows
        low = min(int8_rows, key=lambda r: r["ratio"])
        measured += f"; INT8 min {low['ratio']:.2f}x ({low['model']}, batch {low['batch']}; status counts FP32 only)"
    return _result(1, measured, worst["ratio"], _status(worst["ratio"] >= TARGETS[1].threshold))


def _run_2(run: _Run) -> TargetResult:
    cfg = run.cfg
    with pm.threads_for(1, 1):
        rows = [pm.head_fit_ratio(n, d, k, repeats=cfg.head_repeats, seed=cfg.seed) for n, d, k in cfg.head_tasks]
    run.report.tables["2: linear head fit (500 Adam steps, batch 128), numpy vs PyTorch loop, 1 thread each"] = rows
    worst = min(rows, key=lambda r: r["ratio"])
    equal = all(r["max_abs_dweight"] <= WEIGHT_ATOL and r["max_abs_dbias"] <= WEIGHT_ATOL for r in rows)
    fast = [n for (n, _, _), r in zip(cfg.head_tasks, rows) if r["ratio"] >= TARGETS[2].threshold]
    where = f">= {TARGETS[2].threshold:g}x for N in {fast}; " if fast else ""
    slow = [r for r in rows if r["ratio"] < TARGETS[2].threshold]
    bounds = ("; ceiling of a numpy fit (products + Adam only) where missed: " + ", ".join(f"{r['task']} {r['ceiling']:.1f}x" for r in slow)) if slow else ""
    return _result(2, f"{where}min {worst['ratio']:.1f}x ({worst['task']}){bounds}; weights within {WEIGHT_ATOL:g}: {equal}",
                   worst["ratio"], _status(worst["ratio"] >= TARGETS[2].threshold and equal))


def _run_3(run: _Run) -> TargetResult:
    cfg = run.cfg
    b = run.bundle(cfg.case_model, "case")
    per_query = max(1, cfg.queries // cfg.ways)
    queries = photo_folder(cfg.workdir, f"queries-{cfg.ways}x{per_query}", classes=cfg.ways, per_class=per_query,
                           seed=cfg.seed + 11)
    per = max(1, cfg.support // cfg.ways)
    warmup = photo_folder(cfg.workdir, f"warmup-{cfg.ways}x{per}", classes=cfg.ways, per_class=per, seed=cfg.seed + 13)
    rows, agreement = pm.adapt_ratio(b, run.support_folder(cfg.support), queries, cfg.workdir, threads=run.threads(b),
                                     repeats=cfg.adapt_repeats, seed=cfg.seed, warmup=warmup)
    run.report.tables["3: adapt one task (CaSE + linear head), fsdeploy cold (fresh engines per task) and warm "
                      "(2nd+ task of a session) vs PyTorch eager (model built once, warmed by one task)"] = rows
    run.report.tables["3b: same predictions as the PyTorch eager task, per engine and session"] = [
        {"engine": k, "same_predictions": v} for k, v in agreement.items()]
    ratio, one = rows[0]["ratio"], rows[1]["ratio"]
    cold = [r for r in rows[:-1] if r["session"] == "cold"]
    warm = [r for r in rows[:-1] if r["session"] == "warm"]
    best_cold = max(cold, key=lambda r: r["ratio"])
    best = max(warm, key=lambda r: r["ratio"])
    # issue #21's 6x compares like with like: a warm session against the eager recipe whose model is already built
    # and warmed (both sides adapted one task before the timed ones); issue #8's 4x is the one-shot ORT adapt
    same_tasks = all(r.get("equals_cold_task", True) for r in warm)
    agrees = min(agreement.values()) >= AGREEMENT
    # two claims from two issues, each with its own status: #21's warm 6x and #8's one-shot ORT 4x
    met_21 = best["ratio"] >= FASTEST_ADAPT and agrees and same_tasks
    met_8 = ratio >= TARGETS[3].threshold and agreement.get("ort", 0.0) >= AGREEMENT
    same = ", ".join(f"{k} {100 * v:.1f}%" for k, v in agreement.items())
    each_warm = ", ".join(f"{r['side'].split('--backend ')[1].split(' ')[0]} {r['ratio']:.2f}x" for r in warm)
    return _result(3, f"ORT one-shot {ratio:.2f}x (one context run: {one:.2f}x); cold fastest {best_cold['ratio']:.2f}x "
                      f"({best_cold['side']}); warm session (2nd+ task, decides the 6x): {each_warm}; warm tasks equal cold: "
                      f"{same_tasks}; same predictions {same}", best["ratio"],
                   f"#21 (warm >= {FASTEST_ADAPT:g}x): {_status(met_21)}; #8 (ORT one-shot >= {TARGETS[3].threshold:g}x): "
                   f"{_status(met_8)}")


def _run_4(run: _Run) -> TargetResult:
    cfg = run.cfg
    b = run.bundle(cfg.case_model, "case")
    folders = [run.support_folder(n) for n in cfg.memory_sizes]
    rows, r2 = pm.memory_and_linearity(b, folders, cfg.workdir, threads=run.threads(b)["ort"], repeats=cfg.adapt_repeats)
    run.report.tables["4: `fsdeploy adapt` (CaSE, batch 32): peak RSS of the command per engine (and of a warm "
                      "fsdeploy.Adapter session adapting the largest set twice), in-process time vs support size"] = rows
    largest = max(r["support"] for r in rows)
    at_largest = [r for r in rows if r["support"] == largest]
    peak = max(at_largest, key=lambda r: r["max_rss_mib"])
    ok = peak["max_rss_mib"] <= TARGETS[4].threshold and r2 >= LINEAR_R2
    status = _status(ok) if largest >= 500 else f"partial: largest N={largest} ({_status(ok)} there)"
    each = ", ".join(f"{r['backend']} {r['max_rss_mib']:.0f}" for r in at_largest)
    return _result(4, f"peak RSS at N={largest}: {each} MiB; ORT adapt time vs N: R^2 {r2:.3f}", peak["max_rss_mib"], status)


def _run_5(run: _Run) -> TargetResult:
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.weights import DEFAULT_IMG_SIZE

    cfg = run.cfg
    corpus = glyph_corpus(cfg.workdir, cfg.data, say=run.say)
    data = scan_image_folder(corpus, classes=split_classes(corpus, cfg.split))
    b = run.bundle(cfg.case_model, size=DEFAULT_IMG_SIZE)
    rows = pm.newton_vs_adam(b, data, ways=cfg.accuracy_ways, shots=cfg.accuracy_shots, queries=cfg.accuracy_queries,
                             episodes=cfg.episodes, threads=cfg.threads, seed=cfg.seed)
    run.report.tables[f"5: linear-newton vs linear (Adam), {cfg.accuracy_ways}-way, {len(data.classes)} "
                      f"{cfg.split} classes of {corpus.name}"] = rows
    ok, ratios, parts = True, [], []
    for shots in cfg.accuracy_shots:
        adam, newton = (next(r for r in rows if r["shots"] == shots and r["head"] == h) for h in ("linear", "linear-newton"))
        ratio = adam["fit_macs"] / newton["fit_macs"]
        ratios.append(ratio)
        ok &= newton["accuracy"] >= adam["accuracy"] - adam["ci95"] and ratio >= TARGETS[5].threshold
        parts.append(f"{shots}-shot {newton['accuracy']:.1f} vs {adam['accuracy']:.1f} ± {adam['ci95']:.1f}, "
                     f"{ratio:.0f}x fewer MACs")
    status = _status(ok) if cfg.episodes >= 600 else f"partial: {cfg.episodes} episodes ({_status(ok)} there)"
    return _result(5, "; ".join(parts), min(ratios), status)


def _run_6(run: _Run) -> TargetResult:
    from fsdeploy.bench.perf_engines import chosen_engine, engine_peer_throughput, matmul_peaks

    cfg, images = run.cfg, run.photos()
    bundles = {m: run.bundle(m) for m in cfg.models}
    bundles[f"CaSE {cfg.case_model}"] = run.bundle(cfg.case_model, "case")
    peaks = [matmul_peaks(cfg.threads)]
    rows = []
    for label, b in bundles.items():
        rows += engine_peer_throughput(b, label, images, batches=cfg.batches, threads=cfg.threads, iters=cfg.iters, rounds=cfg.rounds)
    peaks.append(matmul_peaks(cfg.threads))
    peak = {k: max(p[k] for p in peaks) for k in peaks[0]}
    run.report.tables["6a: matmul peaks (GMAC/s, 1024^3, fastest seen at start and end)"] = [peak]
    run.report.tables["6: query throughput, fsdeploy engines vs PyTorch peers (decode + preprocess + features)"] = rows
    agree = _decision_agreement(run)
    run.report.tables["6b: OpenVINO bf16 (its default here) and bf16-mixed vs ORT FP32, NCC decisions on novel glyph episodes"] = agree
    # per model and OpenVINO precision, the least agreement over shots: the gate `fsdeploy tune` applies to a bundle
    least: dict[str, dict[str, float]] = {}
    for r in agree:
        by_precision = least.setdefault(r["model"], {})
        by_precision[r["precision"]] = min(by_precision.get(r["precision"], 1.0), r["decision_agreement"])
    from fsdeploy.engines.openvino import bf16_capable

    bf16 = bf16_capable()
    # the engine fsdeploy would choose per row (the fastest side that passes that model's gate) is what the target reads
    for r in rows:
        gate = least.get(f"{r['model']} (glyph)")
        if gate is None:  # no trained checkpoint of this model: the least agreement of any model measured
            gate = {p: min(g[p] for g in least.values() if p in g) for p in {p for g in least.values() for p in g}}
        r["chosen"], r["chosen_vs_torch_fp32_model"], r["chosen_vs_best_peer"] = chosen_engine(r, _gated_sides(gate, bf16))
    worst = min(rows, key=lambda r: r["chosen_vs_torch_fp32_model"])
    peer = min(rows, key=lambda r: r["chosen_vs_best_peer"])
    ok = worst["chosen_vs_torch_fp32_model"] >= TARGETS[6].threshold and peer["chosen_vs_best_peer"] >= 1.0
    gates = "; ".join(f"{m}: " + ", ".join(f"{p} {100 * v:.1f}%" for p, v in g.items()) for m, g in least.items())
    measured = (f"chosen engine (fastest passing its model's {100 * AGREEMENT:g}% decision gate) vs torch FP32 on model time "
                f"min {worst['chosen_vs_torch_fp32_model']:.2f}x ({worst['model']}, batch {worst['batch']}, {worst['chosen']}); "
                f"vs best peer img/s min {peer['chosen_vs_best_peer']:.2f}x ({peer['model']}, batch {peer['batch']}, "
                f"{peer['chosen']}); peaks fp32 {peak['fp32_gmacs_s']:.0f}, bf16 {peak['bf16_gmacs_s']:.0f}, int8 "
                f"{peak['int8_gmacs_s']:.0f} GMAC/s" + (f"; least share of FP32's decisions (OpenVINO): {gates}" if agree else ""))
    return _result(6, measured, worst["chosen_vs_torch_fp32_model"], _status(ok))


def _gated_sides(least_agreement: dict[str, float], bf16: bool) -> set[str]:
    """The throughput sides that pass the decision-agreement gate: ORT FP32 (the reference) always, and each
    OpenVINO side whose precision kept >= AGREEMENT of FP32's decisions in every 6b setting. OpenVINO's
    `default` is bf16 on a CPU with `bf16` (gated by bf16's agreement), else f32 (the reference's precision)."""
    from fsdeploy.bench.perf_engines import OPENVINO_SIDES

    passing = {"ort_fp32"}
    for side, precision in OPENVINO_SIDES.items():
        if precision == "default" and not bf16:
            passing.add(side)
            continue
        measured = least_agreement.get("bf16" if precision == "default" else precision)
        if measured is not None and measured >= AGREEMENT:
            passing.add(side)
    return passing


def _decision_agreement(run: _Run) -> list[dict[str, Any]]:
    """OpenVINO bf16 (its default here) and bf16-mixed (high-resolution layers f32) against ORT FP32 on the
    trained glyph bundles of the throughput models that fsdeploy ships a checkpoint for, and the CaSE one
    (random-init stand-ins have near-tied decisions that say nothing about a precision), 5-way 1- and 5-shot NCC
    episodes on novel classes."""
    from fsdeploy.deps import available
    from fsdeploy.pipeline.tune import Candidate, tune_bundle
    from fsdeploy.weights import DEFAULT_IMG_SIZE, DEFAULT_MODEL

    if not available("openvino"):
        run.report.notes.append("6b skipped: openvino is not installed (pip install fsdeploy[openvino])")
        return []
    from fsdeploy.weights import shipped

    cfg = run.cfg
    corpus = glyph_corpus(cfg.workdir, cfg.data, say=run.say)
    classes = split_classes(corpus, cfg.split)
    # every throughput model with a shipped glyph checkpoint, at that checkpoint's size, and the shipped CaSE one
    bundles = {f"{m} (glyph)": run.bundle(m, size=rec.img_size) for m in dict.fromkeys([DEFAULT_MODEL, *cfg.models])
               if (rec := shipped(m)) is not None}
    bundles[f"CaSE {DEFAULT_MODEL} (glyph)"] = run.bundle(DEFAULT_MODEL, "case", size=DEFAULT_IMG_SIZE)
    precisions = ("bf16", "bf16-mixed")
    rows = []
    for label, b in bundles.items():
        for shots in cfg.accuracy_shots:
            rec = tune_bundle(b, corpus, classes=classes, candidates=[Candidate("openvino", p) for p in precisions],
                              threads=cfg.threads, shots=shots, queries=cfg.accuracy_queries, episodes=max(50, cfg.episodes // 3),
                              max_images=1000, timer=_untimed, record=False, seed=cfg.seed + shots)
            for row in rec.rows:
                if row["backend"] != "openvino":
                    continue
                if row["status"] != "ok":
                    run.report.notes.append(f"6b {label}: openvino {row['precision']} n/a ({row['reason']})")
                    continue
                a = row["agreement"]
                rows.append({"model": label, "precision": row["precision"], "shots": shots, "episodes": a["episodes"],
                             "decisions": a["decisions"], "decision_agreement": a["decision_agreement"],
                             "centred_cosine_mean": a["centred_cosine_mean"], "centred_cosine_min": a["centred_cosine_min"]})
    return rows


def _untimed(fns: dict[str, Callable[[], Any]], batch: int) -> dict[str, tuple[float, float]]:
    return {k: (float("nan"), float("nan")) for k in fns}


_RUNNERS: dict[int, Callable[[_Run], TargetResult]] = {1: _run_1, 2: _run_2, 3: _run_3, 4: _run_4, 5: _run_5, 6: _run_6}


def with_overrides(cfg: PerfConfig, **changes: Any) -> PerfConfig:
    """`cfg` with the given fields replaced, ignoring None values (CLI options left unset)."""
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
