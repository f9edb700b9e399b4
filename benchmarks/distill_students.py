"""The edge trade-off of distillation: a small student after L2T-ww vs the same student trained directly, with
uniform feature matching, and (optionally) plain fine-tuning, next to the teacher.

Every student trains on the corpus's base classes (`fsdeploy distill`, the same seed, steps and batches for every
method), is exported to a bundle and runs on ONNX Runtime through `fsdeploy.bench.accuracy.evaluate`, the one
episode loop: novel-class 5-way 1/5-shot NCC on L2-normalised features, the same seeded episodes for every row,
so differences against "trained directly" are paired. MACs are counted on the real module (aten-level counter,
one image); latency is the exported graph on ONNX Runtime at batch 1 on this CPU (median, ms).

Usage (full run):
    fsdeploy data glyphs --out data/glyphs
    python benchmarks/distill_students.py --data data/glyphs --teacher efficientnet_b0 --student mobilenetv3_small_050 \
        --epochs 10 --episodes 600 --threads 2 --out benchmarks/results/distill_students.json
Add `--student-checkpoint W.safetensors` for the plain fine-tuning row (the student started from those weights).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fsdeploy.atomic import write_text
from fsdeploy.backbones import create_backbone
from fsdeploy.bench.accuracy import Method, evaluate
from fsdeploy.bench.latency import time_callable
from fsdeploy.bench.macs import count_macs
from fsdeploy.bench.stats import mean_ci95
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.glyphs import load_splits
from fsdeploy.engines import EngineOptions
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.runtime.open import open_graph
from fsdeploy.train.distill import DistillConfig, distill, load_teacher

NCC_L2 = Method("NCC (L2-normalised)", "ncc", "l2")
DIRECT = "student, trained directly (CE only)"


def macs_and_latency(model: str, checkpoint: Path | None, bundle, size: int, threads: int) -> tuple[int, float]:
    """MACs of one image (counted on the torch module) and median ORT batch-1 latency in ms."""
    net, _ = create_backbone(model, checkpoint=checkpoint, img_size=size)
    macs = count_macs(net, torch.zeros(1, 3, size, size)).total
    name, info = next(iter(bundle.manifest.graphs.items()))
    feeds = {next(iter(info.inputs)): np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)}
    with open_graph(bundle, name, "ort", EngineOptions(threads=threads)) as eng:
        stats = time_callable(lambda: eng.run(feeds), warmup=10, budget_s=3.0)
    return macs, stats.median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="glyph corpus (splits.json): train on base, evaluate on novel")
    ap.add_argument("--teacher", default="efficientnet_b0", help="timm name (efficientnet_b0 = shipped weights) or checkpoint")
    ap.add_argument("--student", default="mobilenetv3_small_050")
    ap.add_argument("--student-checkpoint", type=Path, help="adds the plain fine-tuning row, started from these weights")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=None, help="cap training steps (smoke runs)")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("distill_work"), help="students and bundles go here")
    ap.add_argument("--out", type=Path, default=Path("distill_students.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    novel = scan_image_folder(args.data, classes=list(load_splits(args.data).split("novel")))
    _, pre, teacher_name = load_teacher(args.teacher)
    size = pre.input_size[-1]
    base = DistillConfig(teacher=args.teacher, student=args.student, data=args.data, out=args.workdir / "x.safetensors",
                         epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed,
                         threads=args.threads, device="cpu")
    runs = [(DIRECT, replace(base, method="finetune")),
            ("student, uniform feature matching", replace(base, method="uniform")),
            ("student, L2T-ww", replace(base, method="l2t-ww"))]
    if args.student_checkpoint:
        runs.insert(1, ("student, plain fine-tuning", replace(base, method="finetune", student_checkpoint=args.student_checkpoint)))
    models: list[tuple[str, str, Path | None, float]] = []
    teacher_ckpt = Path(args.teacher) if Path(args.teacher).exists() else None
    if teacher_ckpt is None:
        from fsdeploy.weights import shipped, shipped_checkpoint

        teacher_ckpt = shipped_checkpoint(args.teacher) if shipped(args.teacher) else None
    models.append((f"teacher {teacher_name}", teacher_name, teacher_ckpt, 0.0))
    for i, (label, cfg) in enumerate(runs):
        cfg = replace(cfg, out=args.workdir / f"student{i}_{cfg.method}.safetensors")
        t0 = time.perf_counter()
        distill(cfg)
        models.append((label, args.student, cfg.out, time.perf_counter() - t0))
        print(f"trained {label} in {models[-1][3]:.0f} s")

    rows, per = [], {}
    for i, (label, name, ckpt, train_s) in enumerate(models):
        bundle, _ = export_bundle(name, args.workdir / f"bundle{i}", checkpoint=ckpt, img_size=size)
        macs, lat = macs_and_latency(name, ckpt, bundle, size, args.threads)
        row = {"model": label, "timm": name, "macs": macs, "latency_ms": lat, "train_s": round(train_s, 1)}
        for shots in args.shots:
            ep: dict[str, list[float]] = {}
            (r,) = evaluate(bundle, novel, [NCC_L2], ways=args.ways, shots=shots, queries=args.queries,
                            episodes=args.episodes, seed=args.seed + shots, per_episode=ep)
            per[(label, shots)] = np.asarray(ep[NCC_L2.label])
            row[f"{shots}-shot"] = (r.accuracy, r.ci95)
        rows.append(row)
    for row in rows:
        for shots in args.shots:
            if row["model"].startswith("student") and row["model"] != DIRECT:
                row[f"{shots}-shot vs direct"] = mean_ci95(per[(row["model"], shots)] - per[(DIRECT, shots)])
    head = f"{'model':<38} {'MMACs':>7} {'ms':>6} " + " ".join(f"{s}-shot".rjust(13) for s in args.shots)
    print(f"\n{args.ways}-way NCC accuracy (%) on {len(novel.classes)} novel classes, {args.episodes} paired episodes, {size} px")
    print(head)
    for row in rows:
        cells = " ".join(f"{row[f'{s}-shot'][0]:6.2f} ± {row[f'{s}-shot'][1]:4.2f}" for s in args.shots)
        print(f"{row['model']:<38} {row['macs'] / 1e6:7.1f} {row['latency_ms']:6.2f} {cells}")
        for s in args.shots:
            if f"{s}-shot vs direct" in row:
                d, h = row[f"{s}-shot vs direct"]
                print(f"{'':<4}{s}-shot minus trained directly (paired): {d:+.2f} ± {h:.2f} points")
    write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
