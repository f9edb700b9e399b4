"""Novel-class few-shot accuracy: the shipped glyph-pretrained backbone vs the same network at random init.

Features come straight from PyTorch (`create_backbone` + the checkpoint's own preprocessing through
`fsdeploy.data.images`), are L2-normalised, and go to fsdeploy's numpy NCC head (ProtoNet rule, Snell et al.
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

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fsdeploy.backbones import create_backbone
from fsdeploy.bench.stats import mean_ci95
from fsdeploy.data.episodes import sample_episode
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.glyphs import load_splits
from fsdeploy.data.images import iter_batches
from fsdeploy.heads.base import l2_normalise
from fsdeploy.heads.ncc import NCCHead
from fsdeploy.weights import DEFAULT_MODEL, default_checkpoint


def features(model: torch.nn.Module, paths: list[Path], preprocess, batch: int = 256) -> np.ndarray:
    """Pooled backbone features `(N, D)` of every image, preprocessed as the checkpoint says."""
    out = []
    with torch.no_grad():
        for x in iter_batches(paths, preprocess, batch):
            out.append(model(torch.from_numpy(x)).numpy())
    return l2_normalise(np.concatenate(out).astype(np.float64)).astype(np.float32)


def episode_accuracies(feats: np.ndarray, labels: np.ndarray, *, ways: int, shots: int, queries: int, episodes: int, seed: int) -> list[float]:
    """NCC accuracy of each of `episodes` seeded N-way K-shot episodes."""
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(episodes):
        ep = sample_episode(labels, ways, shots, queries, rng)
        head = NCCHead().fit(feats[ep.support], ep.support_labels)
        accs.append(float((head.predict_proba(feats[ep.query]).argmax(1) == ep.query_labels).mean()))
    return accs


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
    checkpoint = args.checkpoint or default_checkpoint()
    pretrained, preprocess = create_backbone(args.model, checkpoint=checkpoint)
    random_init, _ = create_backbone(args.model, img_size=preprocess.input_size[-1])
    console = Console()
    size = preprocess.input_size[-1]
    table = Table(title=f"{args.ways}-way NCC (L2-normalised features) accuracy (%) on {args.split} classes of {args.data}: "
                        f"{len(files.classes)} classes, {len(files)} images, {args.episodes} episodes, {size}px, 95% CI")
    table.add_column("backbone")
    for shots in (1, 5):
        table.add_column(f"{shots}-shot", justify="right")
    table.add_column("features s", justify="right")
    rows = (
        (f"{args.model} glyph-pretrained ({checkpoint.name})", pretrained),
        (f"{args.model} random init", random_init),
    )
    for label, model in rows:
        t0 = time.perf_counter()
        feats = features(model, list(files.paths), preprocess)
        seconds = time.perf_counter() - t0
        cells = []
        for shots in (1, 5):
            accs = episode_accuracies(feats, files.labels, ways=args.ways, shots=shots, queries=args.queries,
                                      episodes=args.episodes, seed=args.seed + shots)
            mean, half = mean_ci95(accs)
            cells.append(f"{100 * mean:.2f} ± {100 * half:.2f}")
        table.add_row(label, *cells, f"{seconds:.1f}")
    console.print(table)
    console.print(f"chance: {100 / args.ways:.1f}%; same episodes for both backbones (seed {args.seed})")


if __name__ == "__main__":
    main()
