"""The README's adaptation-cost section: MACs to adapt one task per method, and accuracy vs MACs.

Reproduces the comparison of UpperCaSE (Patacchiola et al., NeurIPS 2022, Fig. 1) for a ResNet-18 and an
EfficientNet-B0: every method's MACs to adapt one task, counted on the models (`fsdeploy bench macs`), and
the accuracy of the methods fsdeploy runs through its deployed path (`fsdeploy bench accuracy`) on novel
glyph classes, plotted against those MACs.

Weights: efficientnet_b0 uses the shipped glyph-pretrained checkpoint when it is installed (its CaSE bundle the
shipped meta-trained CaSE blocks, identity blocks without them); resnet18 has
no pretrained weights here, so it is a random init with unit-scale BatchNorm statistics (its accuracy is a
floor, its MACs are exact). TSA (ResNet only) and BN-affine are evaluated on the same episodes with a PyTorch
fit per episode (`--finetune-episodes`, fewer than the head methods: each episode trains 40 steps); full,
partial and MAML-style fine-tuning are costed, not evaluated.

Usage:
    fsdeploy data glyphs --out data/glyphs
    python benchmarks/adaptation_cost.py --data data/glyphs [--episodes 600] [--shots 1,5] [--cost-size 224]

Writes benchmarks/results/costs_<model>_<size>px.csv, accuracy_<model>.json and
accuracy_vs_macs_<model>.png (plus the printed tables).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fsdeploy.bench.accuracy import evaluate
from fsdeploy.bench.cost_inputs import (
    CostTable,
    bundle_costs,
    count_bundle,
    count_model,
    transform_macs,
    transform_params,
)
from fsdeploy.bench.costs import TASK_PRESETS, TaskShape, adaptation_costs
from fsdeploy.bench.finetune_accuracy import finetune_accuracy
from fsdeploy.bench.methods import accuracy_methods, default_heads, join_accuracy, method_label
from fsdeploy.bench.perf_measures import threads_for as torch_threads
from fsdeploy.bench.render import accuracy_table, cost_table, plot_accuracy_vs_macs, write_rows
from fsdeploy.bench.workspace import pick_weights, prepare_bundle, split_classes
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.engines import EngineOptions
from fsdeploy.weights import DEFAULT_IMG_SIZE

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="glyph corpus from `fsdeploy data glyphs`")
    parser.add_argument("--split", default="novel")
    parser.add_argument("--models", default="resnet18,efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=DEFAULT_IMG_SIZE, help="bundle input size (accuracy and its MACs)")
    parser.add_argument("--cost-size", type=int, default=224, help="also count every method at this input size (0: skip)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--queries", type=int, default=5, help="per class (every glyph class has >= 10 instances)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--finetune-episodes", type=int, default=100,
                        help="episodes for TSA / BN-affine accuracy (PyTorch fit per episode; 0 skips)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="bundles are exported here once")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console(width=200)
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shots = tuple(int(s) for s in args.shots.split(","))
    data = scan_image_folder(args.data, classes=split_classes(args.data, args.split))
    options = EngineOptions(threads=args.threads)

    for model in args.models.split(","):
        weights = pick_weights(model, args.workdir, args.img_size)
        case_weights = pick_weights(model, args.workdir, args.img_size, adapter="case")
        console.print(f"[bold]{model}[/bold] at {args.img_size} px: {weights.description}; CaSE bundle: "
                      f"{case_weights.description}")
        plain = prepare_bundle(args.workdir, model, img_size=args.img_size, weights=weights, say=console.print,
                               base_data=args.data)  # SimpleShot centres on the base split's mean feature
        case = prepare_bundle(args.workdir, model, adapter="case", img_size=args.img_size, weights=case_weights,
                              say=console.print)
        counts = count_bundle(case)  # the CaSE bundle's backbone is the plain one: every row from one count
        tasks = [TaskShape.from_shots(args.ways, k) for k in shots]
        tables: list[CostTable] = [bundle_costs(case, t, counts=counts) for t in tasks]
        rows = [r for t in tables for r in t.rows]
        console.print(cost_table(rows, title=f"MACs to adapt one task, {model} at {args.img_size} px"))
        write_rows(args.out / f"costs_{model}_{args.img_size}px.csv", rows)

        acc = []
        for k in shots:
            common = dict(ways=args.ways, shots=k, queries=args.queries, episodes=args.episodes, seed=k, options=options)
            acc += evaluate(plain, data, accuracy_methods(default_heads("none"), "none"), label=model, **common)
            acc += evaluate(case, data, accuracy_methods(default_heads("case"), "case"), label=f"{model}+CaSE", **common)
            if args.finetune_episodes:
                methods = ["bn-affine", "bn-affine-olor"] + (["tsa", "tsa-seen"] if plain.manifest.family == "resnet" else [])
                with torch_threads(args.threads or 1):  # see fsdeploy.bench.perf_measures on threads
                    acc += [finetune_accuracy(plain, data, m, label=model, name=method_label(m, "none"), ways=args.ways,
                                              shots=k, queries=args.queries, episodes=args.finetune_episodes, seed=k)
                            for m in methods]
        acc_rows = [r.to_dict() for r in acc]
        console.print(accuracy_table(acc_rows, title=f"{model}: {args.ways}-way accuracy on {len(data.classes)} "
                                                      f"{args.split} classes ({args.episodes} episodes)"))
        write_rows(args.out / f"accuracy_{model}.json", acc_rows)
        merged = [r for t, tab in zip(tasks, tables) for r in join_accuracy(tab.rows, acc_rows, t)]
        png = plot_accuracy_vs_macs(merged, args.out / f"accuracy_vs_macs_{model}.png",
                                    title=f"{model}, {args.img_size} px, {args.ways}-way: accuracy vs MACs to adapt one task")
        console.print(f"wrote {png}")

        if args.cost_size:
            big = count_model(model, "case", img_size=args.cost_size, checkpoint=weights.path)
            presets = [TaskShape.from_shots(args.ways, k) for k in shots] + [TASK_PRESETS["md-max"]]
            big_rows = [r for t in presets for r in adaptation_costs(big, t, transform_macs=transform_macs,
                                                                      transform_params=transform_params)]
            console.print(cost_table(big_rows, title=f"MACs to adapt one task, {model} at {args.cost_size} px"))
            write_rows(args.out / f"costs_{model}_{args.cost_size}px.csv", big_rows)


if __name__ == "__main__":
    main()
