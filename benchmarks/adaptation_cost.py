"""The adaptation-cost comparison (issue #17): per method and backbone, accuracy against MACs to adapt one task.

Reproduces the comparison of UpperCaSE (Patacchiola et al., NeurIPS 2022, Fig. 1): fine-tuners vs meta-learners
(heads on frozen features) vs UpperCaSE (CaSE + the linear head), measured through fsdeploy's deployed path.

- MACs to adapt one task are counted on the real modules (`fsdeploy bench macs`), per task shape.
- Accuracy: one episode loop (`fsdeploy.bench.accuracy.evaluate`) on novel glyph classes. Every row of one
  backbone and shot count sees the same seeded episodes, so differences between rows are paired. Fine-tuners
  are fitted per episode in PyTorch, folded into a re-exported task graph and run on the engine. They run on
  the first `--finetune-episodes` episodes of the same draw (each costs a training run).
- Wall time to adapt one task on this CPU (`fsdeploy.bench.measure.adaptation_times`, one 5-way task of the
  largest shot count, median of `--time-repeats`) and parameters stored per task come with every row.

Weights: each backbone uses `--checkpoint MODEL=PATH` when given, else the shipped glyph checkpoint for it (its
CaSE bundle the shipped meta-trained CaSE blocks, identity blocks without them), else a random init with
unit-scale BatchNorm statistics (its accuracy is then a floor; its MACs are exact).

Usage:
    fsdeploy data glyphs --out data/glyphs
    python benchmarks/adaptation_cost.py --data data/glyphs --episodes 600 --finetune-episodes 600

Writes into --out (benchmarks/results): costs_<model>_<size>px.csv, accuracy_<model>.json,
adaptation_cost.csv (the README table: one row per backbone, shot count and method) and
accuracy_vs_macs.png (a panel per backbone and shot count).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fsdeploy.adapters import ADAPTERS, finetuner_methods
from fsdeploy.bench.accuracy import evaluate
from fsdeploy.bench.cost_inputs import CostTable, bundle_costs, count_bundle, torch_model
from fsdeploy.bench.costs import DEFAULT_METHODS, TaskShape
from fsdeploy.bench.measure import adaptation_times
from fsdeploy.bench.methods import BY_KEY, HEAD_KEYS, accuracy_methods, adaptation_specs, join_accuracy
from fsdeploy.bench.perf_measures import threads_for as torch_threads
from fsdeploy.bench.plots import plot_adaptation_cost
from fsdeploy.atomic import write_text
from fsdeploy.bench.render import accuracy_table, format_macs, read_rows, rows_table, write_rows
from fsdeploy.bench.workspace import Weights, pick_weights, prepare_bundle, split_classes
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.engines import EngineOptions
from fsdeploy.modules.placement import families as placement_families
from fsdeploy.weights import DEFAULT_IMG_SIZE, shipped

RESULTS = Path(__file__).parent / "results"
CASE_HEADS = ("linear",)  # CaSE + linear is UpperCaSE; other heads on CaSE features are not in the seeds' figure
TOAST_HEADS = ("linear",)  # the cost table's TOAST row: TOAST features + the linear head


def plain_heads() -> list[str]:
    """Every head method of the cost table that runs on frozen plain features."""
    return [k for k in HEAD_KEYS if BY_KEY[k].kind == "head"]


def tuners_for(family: str, bundle: Any = None) -> list[str]:
    """Cost-table keys of the per-task fine-tuners defined for this backbone family (BN-affine only where the
    bundle's backbone has BatchNorm layers)."""
    keys = [key for key, (kind, _) in finetuner_methods().items()
            if not ADAPTERS.get(kind).families or family in ADAPTERS.get(kind).families]
    if bundle is not None and not _has_batchnorm(bundle):
        keys = [k for k in keys if finetuner_methods()[k][0] != "bn-affine"]
    return keys


def _has_batchnorm(bundle: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in torch_model(bundle).modules())


SEARCHED = "Partial fine-tuning (searched layers + head)"


def searched_partial(bundle: Any, counts: Any, spec: Path) -> tuple[Any, list[Any]]:
    """`counts` with the partial-ft graph re-counted for the units `spec` trains (per image: the same forward, the
    backward of those units; `fsdeploy.train.finetune.finetune_adapt_macs`' convention, which equals the cost
    table's for the default last block), and the cost methods with that row relabelled."""
    from fsdeploy.adapters.partial_ft import multipliers
    from fsdeploy.bench.costs import TrainedGraph
    from fsdeploy.train.finetune import finetune_adapt_macs, trained_parameters

    net = torch_model(bundle)
    size = int(bundle.manifest.preprocess.input_size[-1])
    mults = multipliers(net, str(spec))
    backward = finetune_adapt_macs(net, size, 1, 1, multipliers=mults) - finetune_adapt_macs(net, size, 1, 1, multipliers={})
    params = sum(p.numel() for _, p, _ in trained_parameters(net, mults))
    graph = TrainedGraph(counts.partial.forward, backward, params)
    methods = [replace(m, label=SEARCHED) if m.key == "partial-ft" else m for m in DEFAULT_METHODS]
    return replace(counts, partial=graph), methods


def model_files(parser: argparse.ArgumentParser, flag: str, values: list[str], models: str, what: str) -> dict[str, Path]:
    """MODEL=PATH values of a repeatable option, by model; a malformed one, a model outside --models or a missing
    file ends the run with one usage line before anything is written."""
    bad = [v for v in values if "=" not in v or v.split("=", 1)[0] not in models.split(",")
           or not Path(v.split("=", 1)[1]).is_file()]
    if bad:
        parser.error(f"{flag}: each is MODEL=PATH with MODEL in --models and PATH {what} (got {', '.join(bad)})")
    return {m: Path(f) for m, f in (v.split("=", 1) for v in values)}


def task_folder(data: Any, ways: int, shots: int, root: Path) -> Path:
    """An ImageFolder of links to `shots` images of the first `ways` classes: the task wall time is taken on."""
    for c in range(ways):
        d = root / data.classes[c]
        d.mkdir(parents=True, exist_ok=True)
        for p in [p for p, y in zip(data.paths, data.labels) if y == c][:shots]:
            (d / p.name).symlink_to(p.resolve())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="glyph corpus from `fsdeploy data glyphs`")
    parser.add_argument("--split", default="novel")
    parser.add_argument("--models", default="resnet18,efficientnet_b0")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="weights for one backbone (repeatable); a `fsdeploy metatrain` checkpoint also gives its CaSE bundle the meta-trained blocks, a plain one identity blocks")
    parser.add_argument("--toast-checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="TOAST-tuned weights of a ViT backbone (`fsdeploy toast-tune`, repeatable): adds the "
                             "'TOAST + linear' row (top-down tuning is per dataset, so its MACs are not per task)")
    parser.add_argument("--partial-spec", action="append", default=[], metavar="MODEL=PATH",
                        help="layer spec from `python -m fsdeploy.train.partial_search` for a backbone (repeatable): its "
                             "partial-ft row fine-tunes the searched units at their rates (Shen et al.) instead of the "
                             "last block, and is costed for them")
    parser.add_argument("--img-size", type=int, default=None,
                        help="bundle input size (accuracy and its MACs); default: the size each shipped checkpoint "
                             f"was trained at, else {DEFAULT_IMG_SIZE}")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--queries", type=int, default=5, help="per class (every glyph class has >= 10 instances)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--finetune-episodes", type=int, default=100,
                        help="episodes (the first of the same draw) for the per-task fine-tuners; 0 skips them")
    parser.add_argument("--methods", default="", help="comma-separated cost-table keys (default: every method)")
    parser.add_argument("--time-repeats", type=int, default=3, help="repeats of the wall-time measurement (0 skips)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="bundles are exported here once")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                        help="only merge earlier runs' adaptation_cost.csv (later folders win per backbone, setting and "
                             "method) into --out, and draw the figure: e.g. cheap heads at 600 episodes from one run, "
                             "fine-tuners at fewer from another")
    args = parser.parse_args()
    if args.combine:
        missing = [str(d) for d in args.combine if not (d / "adaptation_cost.csv").is_file()]
        if missing:
            parser.error(f"--combine: no adaptation_cost.csv in {', '.join(missing)} (each folder is an earlier run's --out)")
        return combine(args.combine, args.out, ways=args.ways)
    toast_given = model_files(parser, "--toast-checkpoint", args.toast_checkpoint, args.models, "a file")
    specs = model_files(parser, "--partial-spec", args.partial_spec, args.models, "a spec file")
    console = Console(width=int(os.environ.get("COLUMNS", 120)))
    args.workdir.mkdir(parents=True, exist_ok=True)
    shots = tuple(int(s) for s in args.shots.split(","))
    wanted = {k.strip() for k in args.methods.split(",") if k.strip()}
    given = dict(c.split("=", 1) for c in args.checkpoint)
    data = scan_image_folder(args.data, classes=split_classes(args.data, args.split))
    options = EngineOptions(threads=args.threads)
    summary: list[dict[str, Any]] = []

    for model in args.models.split(","):
        size = args.img_size or (shipped(model).img_size if shipped(model) else DEFAULT_IMG_SIZE)
        if model in given:
            weights = case_weights = Weights(Path(given[model]), Path(given[model]).name)
        else:
            weights = pick_weights(model, args.workdir, size)
            case_weights = pick_weights(model, args.workdir, size, adapter="case")
        plain = prepare_bundle(args.workdir, model, img_size=size, weights=weights, say=console.print,
                               base_data=args.data)  # SimpleShot centres on the base split's mean feature
        family = plain.manifest.family
        has_case = family in placement_families("case")  # UpperCaSE places CaSE blocks in CNNs only
        console.print(f"[bold]{model}[/bold] at {size} px: {weights.description}"
                      + (f"; CaSE: {case_weights.description}" if has_case else "; no CaSE placement for this family"))
        case = prepare_bundle(args.workdir, model, adapter="case", img_size=size, weights=case_weights,
                              say=console.print) if has_case else None
        toast = None
        if model in toast_given and (not wanted or "toast" in wanted):
            toast = prepare_bundle(args.workdir, model, adapter="toast", img_size=size, say=console.print,
                                   weights=Weights(toast_given[model], toast_given[model].name),
                                   options={"backbone_checkpoint": str(weights.path)} if weights.path else None)
        heads = [k for k in plain_heads() if not wanted or k in wanted]
        tuners = [k for k in tuners_for(family, plain) if not wanted or k in wanted] if args.finetune_episodes else []
        with_case = has_case and (not wanted or "case-linear" in wanted)
        costed = case or toast or plain  # an adapter bundle's backbone is the plain one: every row from one count
        counts = count_bundle(costed)
        cost_methods = DEFAULT_METHODS
        if model in specs:  # the searched layer set replaces the last block in the partial-ft row, counted for it
            counts, cost_methods = searched_partial(plain, counts, specs[model])
        tasks = [TaskShape.from_shots(args.ways, k) for k in shots]
        tables: list[CostTable] = [bundle_costs(costed, t, cost_methods, counts=counts) for t in tasks]
        args.out.mkdir(parents=True, exist_ok=True)  # made once there is something to write, not before the exports
        write_rows(args.out / f"costs_{model}_{size}px.csv", [r for t in tables for r in t.rows])

        acc = []
        for k in shots:
            common = dict(ways=args.ways, shots=k, queries=args.queries, seed=k, options=options, label=model)
            acc += evaluate(plain, data, accuracy_methods(heads, "none"), episodes=args.episodes, **common)
            if with_case:
                acc += evaluate(case, data, accuracy_methods(CASE_HEADS, "case"), episodes=args.episodes, **common)
            if toast is not None:
                acc += evaluate(toast, data, accuracy_methods(TOAST_HEADS, "toast"), episodes=args.episodes, **common)
            if tuners:
                with torch_threads(args.threads or 1):  # see fsdeploy.bench.perf_measures on threads
                    tuned = accuracy_methods(tuners, "none")
                    if model in specs:
                        tuned = [replace(m, label=SEARCHED, opts={**m.opts, "spec": str(specs[model])})
                                 if m.adapter == "partial-ft" else m for m in tuned]
                    acc += evaluate(plain, data, tuned, episodes=args.finetune_episodes, **common)
        acc_rows = [r.to_dict() for r in acc]
        console.print(accuracy_table(acc_rows, title=f"{model}: {args.ways}-way accuracy on {len(data.classes)} "
                                                      f"{args.split} classes"))
        write_rows(args.out / f"accuracy_{model}.json", acc_rows)

        times: dict[str, float] = {}
        if args.time_repeats:
            with tempfile.TemporaryDirectory() as tmp:
                folder = task_folder(data, args.ways, max(shots), Path(tmp))
                # a searched partial-ft row keeps the episode loop's time: the timed run fits the registry's options
                timed = [(plain, [k for k in heads + tuners if not (model in specs and k == "partial-ft")], None)] + ([(case, ["linear"], "case-linear")] if with_case else []) \
                    + ([(toast, ["linear"], "toast")] if toast is not None else [])
                for bundle, keys, name in timed:
                    for row in adaptation_times(bundle, folder, adaptation_specs(keys), options=options,
                                                repeats=args.time_repeats):
                        times[name or row.method] = row.total_ms
        for t, tab in zip(tasks, tables):
            for r in join_accuracy(tab.rows, acc_rows, t):
                a = next(a for a in acc_rows if a["method"] == r["label"] and a["shots"] == t.n_support // t.ways)
                key = "partial-ft-search" if r["label"] == SEARCHED else r["method"]  # beside the last-block row when merged
                summary.append({"backbone": model, "setting": r["setting"], "method": key, "label": r["label"],
                                "regime": r["regime"], "accuracy": r["accuracy"], "ci95": r["ci95"],
                                "adapt_macs": r["adapt_macs"],
                                # the timed task's wall time, else the episode loop's median features + fit
                                "adapt_ms": times.get(r["method"], a["features_ms"] + a["fit_ms"]),
                                "params_per_task": r["params_adapted"], "episodes": a["episodes"],
                                "diverged": a.get("diverged", 0)})
        console.print(rows_table([r for r in summary if r["backbone"] == model],
                                 title=f"{model}: accuracy, MACs and time to adapt one task"))

    write_summary(summary, args.out, ways=args.ways, console=console)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README table: per backbone and method, accuracy at each shot count, then the costs of the largest one."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    last = settings[-1]
    head = ["backbone", "method", "regime", *settings, f"adapt MACs ({last})", f"adapt s ({last})",
            "params per task", "episodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    keyed = {(r["backbone"], r["method"], r["setting"]): r for r in rows}
    order = {b: i for i, b in enumerate(dict.fromkeys(r["backbone"] for r in rows))}
    for backbone, method in sorted(dict.fromkeys((r["backbone"], r["method"]) for r in rows), key=lambda k: order[k[0]]):
        per = [keyed.get((backbone, method, s)) for s in settings]
        ref = per[-1] or next(r for r in per if r)
        acc = [f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" + (f" ({r['diverged']} diverged)" if r.get("diverged") else "")
               if r else "—" for r in per]
        secs = ref.get("adapt_ms")
        secs = "—" if secs is None or secs != secs else f"{secs / 1e3:.2f}"
        episodes = "/".join(str(r["episodes"]) for r in per if r)
        macs = format_macs(ref["adapt_macs"]) + ("" if ref is per[-1] else f" ({ref['setting']})")
        lines.append("| " + " | ".join([backbone, ref["label"], ref.get("regime", ""), *acc, macs,
                                         secs, f"{ref['params_per_task']:,}", episodes]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict[str, Any]], out: Path, *, ways: int, console: Console | None = None) -> None:
    """adaptation_cost.csv, its README table (adaptation_cost.md) and accuracy_vs_macs.png in `out`."""
    write_rows(out / "adaptation_cost.csv", rows)
    write_text(out / "adaptation_cost.md", markdown_table(rows))
    png = plot_adaptation_cost(rows, out / "accuracy_vs_macs.png",
                               title=f"{ways}-way accuracy on novel glyph classes vs MACs to adapt one task "
                                     "(each backbone at its trained size)")
    (console or Console()).print(f"wrote {out / 'adaptation_cost.csv'} and {png}")


def combine(folders: list[Path], out: Path, *, ways: int) -> None:
    """Merge the adaptation_cost.csv of earlier runs; a later folder's row replaces an earlier one's."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for folder in folders:
        for row in read_rows(folder / "adaptation_cost.csv"):
            if row.get("accuracy") is not None:
                merged[(row["backbone"], row["setting"], row["method"])] = row
    out.mkdir(parents=True, exist_ok=True)
    write_summary(list(merged.values()), out, ways=ways)


if __name__ == "__main__":
    from fsdeploy.errors import FsdeployError

    try:
        main()
    except FsdeployError as exc:  # bad weights, bundles or data: one line, as the fsdeploy CLI prints it
        raise SystemExit(f"error: {exc}") from None
