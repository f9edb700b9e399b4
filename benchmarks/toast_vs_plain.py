"""Few-shot NCC accuracy of plain-ViT features vs TOAST-tuned features, with 95% CIs over episodes.

TOAST (Shi et al., "TOAST: Transfer Learning via Attention Steering") is pre-tuned (`--pretune-epochs`, the
released first stage, with the variational loss) and then tuned on the base classes, with the released recipe
unless options say otherwise (`--no-flip` is advisable for glyphs); both
feature extractors then serve held-out novel classes through a nearest-centroid (ProtoNet) head, on the
same seeded episodes, so the rows differ only in the features.

Data: a glyph corpus from `fsdeploy.data.glyphs` (its splits.json names base and novel classes), or any
two ImageFolder trees via --tune-dir / --eval-dir.

    python benchmarks/toast_vs_plain.py --data glyphs64 --model vit_tiny_patch16_224 --img-size 64 \
        --checkpoint vit_tiny_glyphs.safetensors --pretune-epochs 20 --epochs 20 --no-flip --shots 1 5 --episodes 600 \
        --out toast_vs_plain.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fsdeploy.atomic import write_text
from fsdeploy.backbones import save_checkpoint
from fsdeploy.bench.accuracy import Method, evaluate
from fsdeploy.bench.stats import accuracy_row, mean_ci95
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.modules.toast import TopDownViT, toast_macs, vit_macs
from fsdeploy.train.toast import pretune_toast, tune_toast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="glyph corpus root (has splits.json)")
    ap.add_argument("--tune-split", default="base")
    ap.add_argument("--eval-split", default="novel")
    ap.add_argument("--tune-dir", type=Path, help="ImageFolder to tune on (instead of --data)")
    ap.add_argument("--eval-dir", type=Path, help="ImageFolder of held-out classes (instead of --data)")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--checkpoint", type=Path, help="frozen backbone weights; without it timm's random init is used")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=100, help="downstream tuning epochs (released: 100)")
    ap.add_argument("--pretune-epochs", type=int, default=100, help="pre-tuning epochs on the tune split first (0: skip)")
    ap.add_argument("--warmup-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--no-flip", action="store_true", help="no horizontal flips (mirrored glyphs are other glyphs)")
    ap.add_argument("--head-lr", type=float, default=None, help="default: --lr (released)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lite-rank", type=int, default=0)
    ap.add_argument("--recon-weight", type=float, default=0.0)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("toast_vs_plain.json"))
    args = ap.parse_args()

    if args.data is not None:
        from fsdeploy.data.glyphs import load_splits

        splits = load_splits(args.data)
        tune_root, tune_classes = args.data, splits.split(args.tune_split)
        eval_root, eval_classes = args.data, splits.split(args.eval_split)
    elif args.tune_dir is not None and args.eval_dir is not None:
        tune_root, tune_classes, eval_root, eval_classes = args.tune_dir, None, args.eval_dir, None
    else:
        ap.error("pass --data CORPUS, or both --tune-dir and --eval-dir")

    start = time.perf_counter()
    recipe = dict(classes=tune_classes, checkpoint=args.checkpoint, img_size=args.img_size, warmup_epochs=args.warmup_epochs,
                  lr=args.lr, optimizer=args.optimizer, flip=not args.no_flip, batch_size=args.batch_size, seed=args.seed,
                  device=args.device)
    pretuned = None
    if args.pretune_epochs > 0:
        pretuned = args.out.with_suffix(".pretuned.safetensors")
        pretune_toast(args.model, tune_root, epochs=args.pretune_epochs, out=pretuned, **recipe)
    result = tune_toast(
        args.model, tune_root, epochs=args.epochs, head_lr=args.head_lr, lite_rank=args.lite_rank, pretuned=pretuned,
        recon_weight=args.recon_weight, out=args.out.with_suffix(".safetensors"), **recipe,
    )
    tune_s = time.perf_counter() - start
    toast: TopDownViT = result.module.merge_lora().eval()
    plain = toast.backbone
    preprocess = result.preprocess
    eval_files = scan_image_folder(eval_root, classes=list(eval_classes) if eval_classes else None)
    macs = {"plain ViT + NCC": vit_macs(plain, args.img_size), "TOAST + NCC": toast_macs(toast, args.img_size)}
    ncc = Method("NCC", "ncc")  # nearest centroid, squared Euclidean (ProtoNet's rule)
    rows, deltas = [], []
    with tempfile.TemporaryDirectory(prefix="fsdeploy-toast-") as tmp:
        # both rows run exported bundles on ONNX Runtime through `bench accuracy`'s episode loop (the deployed path),
        # on the same frozen backbone weights
        backbone = save_checkpoint(plain.state_dict(), Path(tmp) / "backbone.safetensors", name=args.model, preprocess=preprocess)
        bundles = {
            "plain ViT + NCC": export_bundle(args.model, Path(tmp) / "plain", checkpoint=backbone, img_size=args.img_size)[0],
            "TOAST + NCC": export_bundle(args.model, Path(tmp) / "toast", adapter="toast", checkpoint=args.out.with_suffix(".safetensors"),
                                         img_size=args.img_size, options={"backbone_checkpoint": str(backbone)})[0],
        }
        for shots in args.shots:
            accs = {}
            for label, bundle in bundles.items():
                per: dict[str, list[float]] = {}
                evaluate(bundle, eval_files, [ncc], ways=args.ways, shots=shots, queries=args.queries, episodes=args.episodes,
                         seed=args.seed, per_episode=per)
                accs[label] = np.array(per["NCC"]) / 100
                rows.append(accuracy_row(label, accs[label].tolist(), ways=args.ways, shots=shots, macs_per_image=macs[label]))
            delta, half = mean_ci95(accs["TOAST + NCC"] - accs["plain ViT + NCC"])  # paired: same episodes
            deltas.append({"ways": args.ways, "shots": shots, "toast_minus_plain": 100 * delta, "ci95": 100 * half})
    report = {
        "model": args.model, "img_size": args.img_size, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "tune_classes": len(result.classes), "tune_images": result.train_images,
        "eval_classes": len(eval_files.classes), "eval_images": len(eval_files), "epochs": args.epochs, "pretune_epochs": args.pretune_epochs, "warmup_epochs": args.warmup_epochs,
        "optimizer": args.optimizer, "flip": not args.no_flip, "lr": args.lr, "head_lr": args.head_lr,
        "lite_rank": args.lite_rank, "recon_weight": args.recon_weight, "tune_seconds": round(tune_s, 1),
        "tune_loss_before": result.initial_loss, "tune_loss_after": result.final_loss,
        "tune_train_accuracy": result.train_accuracy, "trainable_params": result.trainable_params, "rows": rows,
        "paired_deltas": deltas,
    }
    write_text(args.out, json.dumps(report, indent=1))
    print(f"tuned {result.trainable_params:,} top-down params on {report['tune_images']} images / {report['tune_classes']} classes "
          f"in {tune_s:.0f} s; train CE {result.initial_loss:.3f} -> {result.final_loss:.3f}")
    for r in rows:
        print(f"{r['ways']}-way {r['shots']}-shot  {r['method']:<16} {r['accuracy']:6.2f} +- {r['ci95']:.2f} %  "
              f"({r['episodes']} episodes, {r['macs_per_image'] / 1e6:.1f} M MACs/image)")
    for d in deltas:
        print(f"{d['ways']}-way {d['shots']}-shot  TOAST - plain (paired) {d['toast_minus_plain']:+.2f} +- {d['ci95']:.2f} points")


if __name__ == "__main__":
    main()
