"""Novel-class few-shot accuracy: the shipped glyph-pretrained backbone vs the same network at random init.

Each backbone is exported to a bundle and runs on ONNX Runtime (the deployed path) through the episode loop of
`fsdeploy bench accuracy`; features are L2-normalised and go to fsdeploy's numpy NCC head (ProtoNet rule, Snell et al.
2017; normalising first as in SimpleShot, Wang et al. 2019). Every backbone sees the same seeded episodes from
the corpus's novel split (scripts never seen in pretraining). The random baseline is timm's initialisation as
is (eval-mode BatchNorm with initial statistics shrinks its features to ~1e-6; normalising keeps their
direction, which is what NCC uses). Re-estimating its BatchNorm statistics on base images was measured too and
did worse (25% 1-shot), so the plain initialisation is the baseline.

Usage:
    fsdeploy data glyphs --out data/glyphs
    python benchmarks/pretrained_vs_random.py --data data/glyphs [--episodes 600] [--checkpoint FILE]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import tempfile

import torch
from rich.console import Console
from rich.table import Table

from fsdeploy.backbones import create_backbone, save_checkpoint
from fsdeploy.bench.accuracy import Method, evaluate
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.glyphs import load_splits
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.weights import DEFAULT_MODEL, shipped_checkpoint

NCC_L2 = Method("NCC (L2-normalised)", "ncc", "l2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="glyph corpus from `fsdeploy data glyphs`")
    parser.add_argument("--split", default="novel", help="split to draw episodes from (default: novel)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped glyph checkpoint")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5, help="per class (classes have >= 10 typefaces)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the random-init baseline is reproducible

    files = scan_image_folder(args.data, classes=list(load_splits(args.data).split(args.split)))
    checkpoint = args.checkpoint or shipped_checkpoint(args.model)
    pretrained, preprocess = create_backbone(args.model, checkpoint=checkpoint)
    random_init, _ = create_backbone(args.model, img_size=preprocess.input_size[-1])
    console = Console()
    size = preprocess.input_size[-1]
    table = Table(title=f"{args.ways}-way NCC (L2-normalised features) accuracy (%) on {args.split} classes of {args.data}: "
                        f"{len(files.classes)} classes, {len(files)} images, {args.episodes} episodes, {size}px, 95% CI")
    table.add_column("backbone")
    for shots in (1, 5):
        table.add_column(f"{shots}-shot", justify="right")
    table.add_column("run s", justify="right")
    with tempfile.TemporaryDirectory(prefix="fsdeploy-pvr-") as tmp:
        random_ckpt = save_checkpoint(random_init.state_dict(), Path(tmp) / "random.safetensors", name=args.model, preprocess=preprocess)
        rows = (
            (f"{args.model} glyph-pretrained ({checkpoint.name})", checkpoint),
            (f"{args.model} random init", random_ckpt),
        )
        for label, ckpt in rows:
            # the deployed path: an exported bundle on ONNX Runtime, the one episode loop of `bench accuracy`
            bundle, _ = export_bundle(args.model, Path(tmp) / label.split()[1], checkpoint=ckpt, img_size=size)
            t0 = time.perf_counter()
            cells = []
            for shots in (1, 5):
                (row,) = evaluate(bundle, files, [NCC_L2], ways=args.ways, shots=shots, queries=args.queries,
                                  episodes=args.episodes, seed=args.seed + shots)
                cells.append(f"{row.accuracy:.2f} ± {row.ci95:.2f}")
            table.add_row(label, *cells, f"{time.perf_counter() - t0:.1f}")
    console.print(table)
    console.print(f"chance: {100 / args.ways:.1f}%; same episodes for both backbones (seed {args.seed})")


if __name__ == "__main__":
    main()
