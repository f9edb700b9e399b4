"""`fsdeploy bench`: what adapting to a task costs (MACs), how accurate it is, and how fast it runs.

Issue #7 (the adaptation-cost benchmark) and #8 (speed targets). Every command is a thin shell over
`fsdeploy.bench`: measuring lives there, this module parses options and prints.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from fsdeploy.commands.output import echo_json, err_console, out_console
from fsdeploy.commands.progress import counting, progress, progress_steps
from fsdeploy.commands.aliases import renamed
from fsdeploy.errors import InvalidInput

console = out_console()
err = err_console()

bench = typer.Typer(
    name="bench",
    help=(
        "Benchmarks on your own bundle and data: `macs` (cost of adapting one task, per method), `accuracy` "
        "(episodes on held-out classes), `latency` (engine percentiles and adaptation time), `perf` (the "
        "speed targets of issue #8, measured side by side)."
    ),
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to `app`."""
    app.add_typer(bench, name="bench")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInput(f"{what} must be comma-separated integers like 1,5; got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInput(f"{what} needs positive integers like 1,5; got {text!r}")
    return values


def _device_help() -> str:
    from fsdeploy.engines.devices import HELP

    return HELP


DeviceOpt = Annotated[Optional[str], typer.Option(help=_device_help())]


def check_device(backend: str, device: Optional[str]) -> None:
    from fsdeploy.engines.devices import check_device as check

    check(backend, device)


BundleArg = Annotated[Path, typer.Argument(help="Bundle folder from `fsdeploy export`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the rows as one JSON list on stdout (what --out FILE.json holds) "
                                                     "instead of tables; progress and notes go to stderr.")]


def _say(as_json: bool):
    """Where a command's notes go: stdout with the tables, stderr under --json."""
    return err if as_json else console
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the rows to this .csv or .json file.")]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(min=1, help="CPU threads per engine, every backend alike (default: the backend's choice). On a busy shared "
                      "machine 1 avoids threads spinning at barriers, which slows PyTorch most."),
]


@bench.command("macs")
def macs(
    bundle: BundleArg,
    ways: Annotated[int, typer.Option(min=1, help="Classes in the task (K).")] = 5,
    shots: Annotated[str, typer.Option(help="Support images per class (the task has ways x shots); comma-separated for one table block each, e.g. 1,5.")] = "1",
    setting: Annotated[
        Optional[list[str]],
        typer.Option(help="Named task shape instead of --ways/--shots: 5w1s, 5w5s, md-max (50 ways, 500 images). Repeatable."),
    ] = None,
    out: OutOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of accuracy vs MACs to adapt (needs --accuracy).")] = None,
    accuracy: Annotated[
        Optional[Path], typer.Option(help="Rows from `fsdeploy bench accuracy --out` (.json or .csv) to plot against MACs.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """MACs to adapt one task and per query image, and numbers adapted, for every method fsdeploy supports.

    Every figure is counted: backbone and adapter MACs on the bundle's own torch modules (convolutions,
    linears and attention products; backward = one forward per operand that needs a gradient), head MACs
    from the numpy heads' exact counts. Fine-tuning rows state their recipe (steps x batch). Reproduces the
    comparison of UpperCaSE (NeurIPS 2022, Fig. 1) on your bundle.

    Example: fsdeploy bench macs bundle/ --ways 5 --shots 5 --out costs.csv;
    fsdeploy bench macs bundle/ --setting md-max; add --accuracy acc.json --plot fig.png for the figure.
    """
    from fsdeploy.bench.cost_inputs import bundle_costs, count_bundle, task_shape
    from fsdeploy.bench.render import cost_table, write_rows
    from fsdeploy.bundle import load_bundle

    if plot is not None and accuracy is None:
        raise InvalidInput("--plot needs --accuracy ROWS (from `fsdeploy bench accuracy --out`)")
    b = load_bundle(bundle)
    tasks = [task_shape(None, None, s) for s in setting] if setting else [task_shape(ways, k, None) for k in _ints(shots, '--shots')]
    say = _say(as_json)
    with progress(say, "counting MACs on the bundle's torch modules"):
        counts = count_bundle(b)
    tables = [bundle_costs(b, t, counts=counts) for t in tasks]
    rows = [r for t in tables for r in t.rows]
    m = b.manifest
    if as_json:
        echo_json(rows)
    else:
        console.print(cost_table(rows, title=f"MACs to adapt one task, {m.model} ({m.adapter}, {m.preprocess.input_size[-1]} px)"))
    for key, why in tables[0].skipped.items():
        say.print(f"[dim]not costed: {key} ({why})[/dim]")
    if out is not None:
        write_rows(out, rows)
        say.print(f"wrote {len(rows)} rows to {out}")
    if plot is not None and accuracy is not None:
        from fsdeploy.bench.methods import join_accuracy
        from fsdeploy.bench.render import plot_accuracy_vs_macs, read_rows

        acc_rows = read_rows(accuracy)
        merged = [r for t, tab in zip(tasks, tables) for r in join_accuracy(tab.rows, acc_rows, t)]
        plot_accuracy_vs_macs(merged, plot, title=f"{m.model}: accuracy vs MACs to adapt one task")
        say.print(f"wrote {plot} ({len(merged)} methods with accuracy)")


@bench.command("accuracy", cls=renamed({"--heads": "--methods"}))
def accuracy(
    bundle: BundleArg,
    data: Annotated[Path, typer.Option(help="ImageFolder of labelled images (e.g. a glyph corpus from `fsdeploy data glyphs`).")],
    split: Annotated[str, typer.Option(help="With DATA/splits.json: the split whose classes episodes use (novel, val, base, all).")] = "novel",
    ways: Annotated[int, typer.Option(min=1, help="Classes per episode.")] = 5,
    shots: Annotated[str, typer.Option(help="Comma-separated support images per class, one run each.")] = "1,5",
    queries: Annotated[int, typer.Option(min=1, help="Query images per class per episode.")] = 15,
    episodes: Annotated[int, typer.Option(min=1, help="Episodes per setting (600 for paper-style 95% CIs).")] = 600,
    methods: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated methods: head methods ncc, simpleshot, ci, linear, linear-newton, baseline, baseline++, "
                          "lt-ncc, and per-task fine-tuners tsa, tsa-seen, bn-affine, bn-affine-olor (fitted, folded and run on "
                          "the engine per episode) "
                          "(default: ncc,simpleshot,linear,linear-newton; on a CaSE bundle: linear = UpperCaSE)."),
    ] = None,
    variable: Annotated[bool, typer.Option(help="Meta-Dataset-style variable ways and shots instead of --ways/--shots.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the episode draws (same seed: same episodes for every method).")] = 0,
    backend: Annotated[str, typer.Option(help="Engine backend: ort, torch, trt.")] = "ort",
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Few-shot accuracy (mean ± 95% CI over seeded episodes) through the deployed path: engine + numpy head.

    Every method sees the same episodes and the same engine features. Episodes draw from held-out classes:
    with a glyph corpus, --split novel uses scripts the backbone never saw in pretraining.

    Example: fsdeploy bench accuracy bundle/ --data glyphs/ --shots 1,5 --episodes 600 --out acc.json
    """
    from fsdeploy.bench.accuracy import evaluate
    from fsdeploy.bench.methods import accuracy_methods, parse_keys
    from fsdeploy.bench.render import accuracy_table, write_rows
    from fsdeploy.bench.workspace import split_classes
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.engines import EngineOptions
    from fsdeploy.bundle import load_bundle

    check_device(backend, device)
    b = load_bundle(bundle)
    keys = parse_keys(methods, b.manifest.adapter)
    if methods is None and "simpleshot" in keys and "base_mean" not in b.manifest.extra:
        keys = tuple(k for k in keys if k != "simpleshot")
        _say(as_json).print(f"[yellow]simpleshot skipped: {bundle} has no base-class mean (export with --base-data DIR)[/yellow]")
    methods = accuracy_methods(keys, b.manifest.adapter)
    files = scan_image_folder(data, classes=split_classes(data, split))
    settings = (0,) if variable else _ints(shots, "--shots")
    rows = []
    with counting(console, "episodes") as bar:
        for k in settings:
            task = bar.add_task("variable ways/shots" if variable else f"{ways}-way {k}-shot", total=episodes)
            rows += evaluate(b, files, methods, ways=ways, shots=max(k, 1), queries=queries, episodes=episodes,
                             seed=seed + k, variable=variable, backend=backend, options=EngineOptions(threads=threads, device=device),
                             progress=lambda n, task=task: bar.advance(task, n))
    which = split if (data / "splits.json").is_file() and split != "all" else "all classes"
    if as_json:
        echo_json([r.to_dict() for r in rows])
    else:
        console.print(accuracy_table([r.to_dict() for r in rows],
                                     title=f"accuracy (%, mean ± 95% CI) on {len(files.classes)} classes of {data} ({which})"))
    if out is not None:
        write_rows(out, [r.to_dict() for r in rows])
        _say(as_json).print(f"wrote {len(rows)} rows to {out}")


def _compare_rows(runs, backends: list[str]) -> tuple[list[dict], list[str]]:
    """Ratio rows per batch and other backend, and one sentence per pair saying which is faster and by how much.

    Each row keeps `speedup` (how many times faster the other backend is, as `fsdeploy.bench.latency.compare`
    defines it) and adds `<first>_faster`, its inverse: how many times faster the first backend is.
    """
    from fsdeploy.bench.latency import compare as compare_stats

    first = backends[0]
    rows, verdicts = [], []
    for bs in sorted({r.batch for r in runs}):
        a = next(r.engine for r in runs if r.batch == bs and r.backend == first)
        for other in backends[1:]:
            c = next(r.engine for r in runs if r.batch == bs and r.backend == other)
            for row in compare_stats(a, c, names=(first, other)):
                sp = row["speedup"]
                rows.append({"kind": "compare", "batch": bs, "vs": other, **row, f"{first}_faster": 1.0 / sp if sp else float("inf")})
            med_a, med_c = a.median, c.median
            if med_a > 0 and med_c > 0:
                fast, slow, ratio = (first, other, med_c / med_a) if med_a <= med_c else (other, first, med_a / med_c)
                verdicts.append(f"batch {bs}: {fast} is {ratio:.1f}x faster than {slow} (median {med_a:.3g} ms vs {med_c:.3g} ms)"
                                if fast == first else
                                f"batch {bs}: {fast} is {ratio:.1f}x faster than {slow} (median {med_c:.3g} ms vs {med_a:.3g} ms)")
    return rows, verdicts


@bench.command("latency", cls=renamed({"--batch": "--batches"}))
def latency(
    bundle: BundleArg,
    backend: Annotated[str, typer.Option(help="Engine backend: ort (CPU default), trt (NVIDIA GPU), torch (eager reference).")] = "ort",
    batch: Annotated[str, typer.Option("--batches", help="Comma-separated batch sizes to time, one run each.")] = "1,8,32",
    warmup: Annotated[int, typer.Option(help="Untimed calls first (allocation, graph optimisation, caches).")] = 5,
    iters: Annotated[Optional[int], typer.Option(min=1, help="Timed calls per backend and batch (default 30).")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Or: seconds of timed calls per backend and batch.")] = None,
    compare: Annotated[
        Optional[str],
        typer.Option(help="Backends timed side by side in one run, the first as reference, e.g. ort,openvino,torch or "
                          "ort,openvino:bf16,ort:int8 (backend:precision); prints how many times faster the first is than each other."),
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of real images to time (default: photo crops).")] = None,
    support: Annotated[
        Optional[Path], typer.Option(help="Support ImageFolder for adaptation timing (default: 5 classes x 5 photo crops).")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Adaptation methods to time: head methods (ncc, simpleshot, linear, ...), tsa, bn-affine; '' skips.")
    ] = "ncc,linear,linear-newton",
    adapt_repeats: Annotated[int, typer.Option(help="Adaptations per method (medians are shown).")] = 3,
    rounds: Annotated[int, typer.Option(help="Round-robin rounds the timed calls are split into (noise hits every side alike).")] = 5,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Query latency percentiles and throughput per batch size, and adaptation wall time split into its parts.

    The timed call is the deployed query path (CaSE: the query graph under a real γ); decoding and
    preprocessing the same real image files is timed separately and shown as its own column, with the
    throughput it leaves. A run whose spread is too wide is flagged as unstable. Adaptation is timed per
    method as load + engine pass over the support set (CaSE: context pass and γ) + head fit + write.

    Example: fsdeploy bench latency bundle/ --batches 1,8,32 --compare ort,openvino,torch --iters 50
    """
    from fsdeploy.bench.measure import adaptation_times, path_latency, write_photo_folder
    from fsdeploy.bench.methods import adaptation_specs
    from fsdeploy.bench.render import compare_table, latency_table, rows_table, write_rows
    from fsdeploy.data.folders import list_images
    from fsdeploy.engines import EngineOptions
    from fsdeploy.bundle import load_bundle

    b = load_bundle(bundle)
    backends = [s.strip() for s in compare.split(",")] if compare else [backend]
    if compare and len(backends) < 2:
        raise InvalidInput(f"--compare takes two or more backends like ort,openvino,torch; got {compare!r}")
    for name in backends:
        check_device(name.split(":")[0], device)
    options = EngineOptions(threads=threads, device=device)
    specs = adaptation_specs([k.strip() for k in methods.split(",") if k.strip()])
    with tempfile.TemporaryDirectory() as tmp:
        files = list_images([images]) if images else list_images([write_photo_folder(Path(tmp) / "photos", classes=3, per_class=8)])
        say = _say(as_json)
        with progress_steps(say, f"timing {', '.join(backends)} at batches {batch}"):
            runs = path_latency(b, files, backends=backends, batches=_ints(batch, "--batches"), options=options,
                                warmup=warmup, iters=iters, budget_s=budget, rounds=rounds)
        rows = [{"kind": "latency", **r.row()} for r in runs]
        if not as_json:
            console.print(latency_table(rows, title=f"query latency (ms) of {b.manifest.model} ({b.manifest.adapter})"))
        if compare:
            ratio_rows, verdicts = _compare_rows(runs, backends)
            if not as_json:
                if len(backends) > 2:  # one table: each row's compared backend is named in "vs", its value in "other"
                    shown = [{("other" if k == r["vs"] else k): v for k, v in r.items() if k not in ("kind", "speedup")} for r in ratio_rows]
                else:
                    shown = [{k: v for k, v in r.items() if k not in ("kind", "vs", "speedup")} for r in ratio_rows]
                console.print(compare_table(shown, title=f"side by side: {backends[0]}_faster = how many times faster "
                                                         f"{backends[0]} is (> 1: {backends[0]} faster)"))
                for line in verdicts:
                    console.print(line)
            rows += ratio_rows
        if specs:
            folder = support or write_photo_folder(Path(tmp) / "support", classes=5, per_class=5, seed=1)
            with progress(say, "timing adaptation"):
                adapt = adaptation_times(b, folder, specs, backend=backends[0], options=options, repeats=adapt_repeats)
            if not as_json:
                console.print(rows_table([r.as_dict() for r in adapt], title="adaptation wall time per task (median ms per part)"))
            rows += [{"kind": "adaptation", **r.as_dict()} for r in adapt]
    if as_json:
        echo_json(rows)
    if out is not None:
        write_rows(out, rows)
        _say(as_json).print(f"wrote {len(rows)} rows to {out}")


@bench.command("perf")
def perf(
    quick: Annotated[bool, typer.Option(help="Fewer repeats/episodes and support sizes up to 200: a few minutes on 2 cores.")] = False,
    workdir: Annotated[Path, typer.Option(help="Where bundles, images and corpora are made once and reused.")] = Path("fsdeploy-perf"),
    targets: Annotated[str, typer.Option(help="Which targets to measure: issue #8's 1-5, and 6 (fsdeploy engines vs PyTorch peers, matmul peaks).")] = "1,2,3,4,5",
    threads: Annotated[int, typer.Option(min=1, help="Threads for every side (torch, BLAS, ONNX Runtime).")] = 2,
    data: Annotated[Optional[Path], typer.Option(help="Glyph corpus for target 5 (default: render a slice into WORKDIR).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="efficientnet_b0 weights (default: the shipped checkpoint).")] = None,
    episodes: Annotated[Optional[int], typer.Option(min=1, help="Episodes per shot for target 5 (default 600, quick 100).")] = None,
    img_size: Annotated[Optional[int], typer.Option(min=1, help="Input size of targets 1, 3, 4 (default 224).")] = None,
    models: Annotated[Optional[str], typer.Option(help="Plain models of target 1 (default resnet18,efficientnet_b0).")] = None,
    case_model: Annotated[Optional[str], typer.Option(help="CaSE model of targets 1, 3, 4, 5 (default efficientnet_b0).")] = None,
    support: Annotated[Optional[int], typer.Option(min=1, help="Support images of target 3 (default 100).")] = None,
    sizes: Annotated[Optional[str], typer.Option(help="Support sizes of target 4 (default 50,100,200,500).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the whole report (every table) as JSON.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report (what --out holds) as JSON on stdout instead of tables.")] = False,
) -> None:
    """Issue #8's targets, one command: each ratio with its raw timings and spreads, and a status row per target.

    1 query throughput ORT vs PyTorch eager (resnet18, efficientnet_b0, CaSE efficientnet_b0; 224 px; batch 1
    and 16; decoding and preprocessing real image files inside the timed call); 2 numpy linear head vs a
    PyTorch loop (same draws, weights within 1e-5); 3 adapting one task end to end vs PyTorch eager, cold (fresh
    engines per task) and in a warm `fsdeploy.Adapter` session (+ prediction agreement); 4 peak memory of
    `fsdeploy adapt` (and of a warm session) on 500 images and time vs support size; 5 linear-newton vs
    the Adam linear head (accuracy and MACs). Both sides of each ratio run interleaved in this process.

    Targets 1 and 2 also print a ceiling: the ratio an FP32 engine doing the model's MACs at this machine's
    fastest measured matmul would reach (1), and that of a numpy fit doing only each step's two products and
    Adam update (2). A target above its ceiling cannot be met on this machine, whatever the tuning.

    Example: fsdeploy bench perf --quick; fsdeploy bench perf --data glyphs/ --out perf.json
    """
    from fsdeploy.atomic import write_text
    from fsdeploy.bench.perf import PerfConfig, run_perf, with_overrides
    from fsdeploy.bench.render import rows_table, status_table

    base = PerfConfig.quick_config(workdir) if quick else PerfConfig(workdir=workdir)
    cfg = with_overrides(
        base, targets=_ints(targets, "--targets"), threads=threads, data=data, checkpoint=checkpoint, episodes=episodes,
        img_size=img_size, models=tuple(models.split(",")) if models else None, case_model=case_model, support=support,
        memory_sizes=_ints(sizes, "--sizes") if sizes else None,
    )
    say = _say(as_json)
    with progress_steps(say, "measuring") as status:
        report = run_perf(cfg, say=lambda m: status.update(m))  # type: ignore[attr-defined]
    if as_json:
        echo_json(report.to_dict())
        if out is not None:
            write_text(out, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
            err.print(f"wrote {out}")
        return
    for title, rows in report.tables.items():
        console.print(rows_table(rows, title=title))
    console.print(status_table([vars(r) for r in report.results], title=f"issue #8 targets ({'quick' if quick else 'full'} run, {threads} threads)"))
    for note in report.notes:
        console.print(f"[dim]{note}[/dim]")
    if out is not None:
        write_text(out, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        console.print(f"wrote {out}")
