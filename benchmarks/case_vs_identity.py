"""Novel-class few-shot accuracy: meta-trained CaSE vs identity CaSE on the same backbone and episodes.

UpperCaSE (Patacchiola et al., NeurIPS 2022, arXiv 2206.09843): CaSE blocks adapt a frozen backbone to
each task in one forward pass over the support set. Identity CaSE (every block at its zero init, γ = 1) is
exactly the plain backbone, so the difference between the rows is what meta-training the CaSE blocks buys.

Both rows use the same backbone weights, the same seeded episodes from the held-out (novel) classes and
the same head (default: fsdeploy's numpy UpperCaSE linear head). Each CaSE network is exported to a bundle and
runs on ONNX Runtime through the episode loop of `fsdeploy bench accuracy` (the deployed path): the context pass
over the support set gives the support features and γ; the query graph runs under that γ.
The table reports mean accuracy with its 95% CI per row, and the paired per-episode difference with its CI.

Usage:
    fsdeploy data glyphs --out data/glyphs
    python benchmarks/case_vs_identity.py --data data/glyphs --tasks 2000        # meta-trains first
    python benchmarks/case_vs_identity.py --data data/glyphs --case case.safetensors  # reuse a checkpoint
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fsdeploy.backbones import BuildRequest
from fsdeploy.bench.accuracy import Method, evaluate
from fsdeploy.bench.stats import mean_ci95
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.modules.case_checkpoint import build_casenet
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.train.metatrain import HeadRecipe, TaskStats, episode_classes, metatrain
from fsdeploy.weights import DEFAULT_MODEL, shipped_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder with splits.json (a glyph corpus)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoint", type=Path, default=None, help="backbone weights; default: the shipped glyph checkpoint")
    parser.add_argument("--case", type=Path, default=None, help="meta-trained CaSE checkpoint; default: meta-train one now")
    parser.add_argument("--case-out", type=Path, default=Path("runs/case_metatrained.safetensors"))
    parser.add_argument("--train-split", default="base")
    parser.add_argument("--split", default="novel", help="held-out classes to evaluate on")
    parser.add_argument("--tasks", type=int, default=2000, help="meta-training tasks when --case is not given")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--head", default="linear", help="fsdeploy head: linear (UpperCaSE), ncc, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--outer", default="upstream", help="meta-training outer step: upstream or context-gamma")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    backbone_ckpt = args.checkpoint or shipped_checkpoint(args.model)

    case_ckpt = args.case
    if case_ckpt is None:
        t0 = time.perf_counter()
        window: list[TaskStats] = []

        def report(stats: TaskStats) -> None:
            window.append(stats)
            if stats.task % 50 == 0 or stats.task == stats.tasks:
                loss = sum(s.loss for s in window) / len(window)
                acc = sum(s.target_acc for s in window) / len(window)
                console.print(f"task {stats.task}/{stats.tasks}: loss {loss:.3f}, target acc {100 * acc:.1f}% "
                              f"(mean of the last {len(window)}), {time.perf_counter() - t0:.0f} s")
                window.clear()

        case_ckpt = metatrain(
            args.model, args.data, args.case_out, checkpoint=backbone_ckpt, split=args.train_split, tasks=args.tasks,
            ways=args.ways, shots=5, queries=10, head=HeadRecipe(), seed=args.seed, device="cpu", progress=report,
            outer=args.outer,
        )
        console.print(f"meta-trained {args.tasks} tasks on {args.train_split} classes in {time.perf_counter() - t0:.0f} s -> {case_ckpt}")

    identity, pre = build_casenet(BuildRequest(args.model, checkpoint=backbone_ckpt))
    trained, _ = build_casenet(BuildRequest(args.model, checkpoint=case_ckpt))
    for k, v in identity.backbone.state_dict().items():  # same backbone, or the comparison means nothing
        if not torch.equal(v, trained.backbone.state_dict()[k]):
            raise SystemExit(f"{case_ckpt} holds a different backbone than {backbone_ckpt} ({k}); pass the matching --checkpoint")

    files = scan_image_folder(args.data, classes=episode_classes(args.data, args.split))
    size = pre.input_size[-1]
    shots = [int(s) for s in args.shots.split(",")]
    table = Table(title=f"{args.ways}-way accuracy (%) on {args.split} classes of {args.data}: {len(files.classes)} classes, "
                        f"{len(files)} images, {args.episodes} episodes, {size}px, head {args.head}, 95% CI")
    table.add_column("CaSE")
    for s in shots:
        table.add_column(f"{s}-shot", justify="right")
    results: dict[str, dict[int, list[float]]] = {}
    method = Method(args.head, args.head)
    with tempfile.TemporaryDirectory(prefix="fsdeploy-case-") as tmp:
        for label, ckpt in (("identity (γ = 1, plain backbone)", backbone_ckpt), (f"meta-trained ({case_ckpt.name})", case_ckpt)):
            bundle, _ = export_bundle(args.model, Path(tmp) / f"b{len(results)}", adapter="case", checkpoint=ckpt, img_size=size)
            results[label] = {}
            for s in shots:
                per: dict[str, list[float]] = {}
                evaluate(bundle, files, [method], ways=args.ways, shots=s, queries=args.queries, episodes=args.episodes,
                         seed=args.seed + s, per_episode=per)
                results[label][s] = [a / 100 for a in per[method.label]]
            table.add_row(label, *(f"{100 * m:.2f} ± {100 * h:.2f}" for m, h in (mean_ci95(results[label][s]) for s in shots)))
    a, b = list(results.values())
    diffs = [mean_ci95(np.subtract(b[s], a[s])) for s in shots]
    table.add_row("difference (paired)", *(f"{100 * m:+.2f} ± {100 * h:.2f}" for m, h in diffs))
    console.print(table)
    console.print(f"chance {100 / args.ways:.1f}%; both rows see the same episodes (seed {args.seed} + shots) and backbone {backbone_ckpt}")


if __name__ == "__main__":
    main()
