"""A small ViT from a small unlabelled set: IDMM pretraining vs random init vs supervised pretraining on base classes.

IDMM (`fsdeploy pretrain MODEL --recipe idmm`) sees only the pixels of ≈2,000 base-class glyph images (the
labels are dropped: the images are linked into one flat folder); the supervised row (`fsdeploy pretrain MODEL`)
trains on the labelled base classes of the same corpus; the random row is timm's initialisation. Each backbone
is exported and evaluated through `fsdeploy.bench.accuracy.evaluate` (ONNX Runtime): novel-class 5-way 1/5-shot
NCC on L2-normalised features, the same seeded episodes for every row, paired differences against random init.

Usage (full run):
    fsdeploy data glyphs --out data/glyphs
    python benchmarks/idmm_vit.py --data data/glyphs --model vit_tiny_patch16_224 --img-size 32 --images 2000 \
        --idmm-epochs 100 --sup-epochs 10 --episodes 600 --threads 2 --out benchmarks/results/idmm_vit.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fsdeploy.atomic import write_text
from fsdeploy.backbones import Preprocess, create_backbone, save_checkpoint
from fsdeploy.bench.accuracy import Method, evaluate
from fsdeploy.bench.stats import mean_ci95
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.glyphs import load_splits
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.train.idmm import IdmmConfig, idmm_pretrain
from fsdeploy.train.pretrain import MEAN, STD, PretrainConfig, pretrain

NCC_L2 = Method("NCC (L2-normalised)", "ncc", "l2")
RANDOM = "random init"


def unlabelled_folder(data: Path, out: Path, n: int, seed: int) -> int:
    """Link `n` images drawn from the base classes into one flat folder (no class structure); returns the count."""
    base = scan_image_folder(data, classes=list(load_splits(data).split("base")))
    pick = np.random.default_rng(seed).permutation(len(base))[:n]
    out.mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(sorted(pick)):
        link = out / f"{j:05d}{base.paths[i].suffix}"
        if not link.exists():
            link.symlink_to(base.paths[i].resolve())
    return len(pick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="glyph corpus (splits.json)")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=2000, help="unlabelled base-class images for IDMM")
    ap.add_argument("--idmm-epochs", type=int, default=100)
    ap.add_argument("--sup-epochs", type=int, default=10)
    ap.add_argument("--supervised-checkpoint", type=Path, default=None,
                    help="use this supervised base-class checkpoint of --model (e.g. the shipped ViT) for the supervised "
                         "row instead of training one for --sup-epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=None, help="cap IDMM steps (smoke runs)")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("idmm_work"))
    ap.add_argument("--out", type=Path, default=Path("idmm_vit.json"))
    args = ap.parse_args()
    if args.supervised_checkpoint is not None and not args.supervised_checkpoint.is_file():
        ap.error(f"--supervised-checkpoint {args.supervised_checkpoint}: no such file")
    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    novel = scan_image_folder(args.data, classes=list(load_splits(args.data).split("novel")))

    n = unlabelled_folder(args.data, work / "unlabelled", args.images, args.seed)
    t0 = time.perf_counter()
    idmm_ckpt = work / "idmm.safetensors"
    idmm_pretrain(IdmmConfig(args.model, work / "unlabelled", idmm_ckpt, img_size=args.img_size, epochs=args.idmm_epochs,
                             batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed, device="cpu", fp16=False))
    idmm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sup_ckpt = args.supervised_checkpoint or work / "supervised.safetensors"
    if args.supervised_checkpoint is None:
        pretrain(PretrainConfig(args.model, args.data, sup_ckpt, img_size=args.img_size, epochs=args.sup_epochs,
                                batch_size=args.batch_size, seed=args.seed, device="cpu", fp16=False))
    sup_s = time.perf_counter() - t0  # ~0 for a given checkpoint: its card has its training time
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        rand, _ = create_backbone(args.model, img_size=args.img_size)
    pre = Preprocess(input_size=(3, args.img_size, args.img_size), mean=MEAN, std=STD, crop_pct=1.0, interpolation="bilinear")
    rand_ckpt = save_checkpoint(rand, work / "random.safetensors", name=args.model, preprocess=pre)
    models = [(RANDOM, rand_ckpt, 0.0), (f"IDMM on {n} unlabelled images", idmm_ckpt, idmm_s),
              ("supervised on base classes", sup_ckpt, sup_s)]
    rows, per = [], {}
    for i, (label, ckpt, train_s) in enumerate(models):
        bundle, _ = export_bundle(args.model, work / f"bundle{i}", checkpoint=ckpt, img_size=args.img_size)
        row = {"backbone": label, "train_s": round(train_s, 1)}
        for shots in args.shots:
            ep: dict[str, list[float]] = {}
            (r,) = evaluate(bundle, novel, [NCC_L2], ways=args.ways, shots=shots, queries=args.queries,
                            episodes=args.episodes, seed=args.seed + shots, per_episode=ep)
            per[(label, shots)] = np.asarray(ep[NCC_L2.label])
            row[f"{shots}-shot"] = (r.accuracy, r.ci95)
            if label != RANDOM:
                row[f"{shots}-shot vs random"] = mean_ci95(per[(label, shots)] - per[(RANDOM, shots)])
        rows.append(row)
    print(f"\n{args.model} at {args.img_size} px, {args.ways}-way NCC accuracy (%) on {len(novel.classes)} novel classes, "
          f"{args.episodes} paired episodes")
    for row in rows:
        cells = "  ".join(f"{s}-shot {row[f'{s}-shot'][0]:6.2f} ± {row[f'{s}-shot'][1]:4.2f}" for s in args.shots)
        print(f"{row['backbone']:<36} {cells}  (train {row['train_s']:.0f} s)")
        for s in args.shots:
            if f"{s}-shot vs random" in row:
                d, h = row[f"{s}-shot vs random"]
                print(f"{'':<4}{s}-shot minus random init (paired): {d:+.2f} ± {h:.2f} points")
    write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
