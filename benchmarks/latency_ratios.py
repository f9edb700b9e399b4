"""The README's latency section: ONNX Runtime vs PyTorch eager, side by side, per model and batch size.

For each model (and its CaSE variant) the deployed query path is timed on both backends, interleaved in
one process (`fsdeploy bench latency --compare ort,torch`), at each batch size; decoding and
preprocessing the same real photo files is timed apart. The printed ratios are the claims: this machine
is shared and noisy, absolute times are not.

Threads: `--threads` applies to both sides (default 1). On a busy shared box a second OpenMP thread can
make PyTorch many times slower, which would flatter the ratio; on a dedicated device try --threads 2.

Usage:
    python benchmarks/latency_ratios.py [--models resnet18,efficientnet_b0] [--img-size 224] [--batch 1,8,32]

Writes benchmarks/results/latency_ratios.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fsdeploy.bench.latency import compare
from fsdeploy.bench.measure import path_latency
from fsdeploy.bench.render import latency_table, rows_table, write_rows
from fsdeploy.bench.workspace import photo_folder, pick_weights, prepare_bundle
from fsdeploy.engines import EngineOptions

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,efficientnet_b0")
    parser.add_argument("--case", default="efficientnet_b0", help="model also timed with CaSE blocks ('' to skip)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per backend and batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "latency_ratios.csv")
    args = parser.parse_args()
    console = Console(width=200)
    args.workdir.mkdir(parents=True, exist_ok=True)
    images = sorted(photo_folder(args.workdir, "photos", classes=3, per_class=8, seed=0).rglob("*.jpg"))
    jobs = [(m, "none") for m in args.models.split(",")] + ([(args.case, "case")] if args.case else [])
    rows = []
    for model, adapter in jobs:
        weights = pick_weights(model, args.workdir, args.img_size)
        bundle = prepare_bundle(args.workdir, model, adapter=adapter, img_size=args.img_size, weights=weights,
                                say=console.print)
        runs = path_latency(bundle, images, backends=("ort", "torch"), batches=[int(b) for b in args.batch.split(",")],
                            options=EngineOptions(threads=args.threads), iters=args.iters, rounds=args.rounds)
        name = f"{model}{' + CaSE' if adapter == 'case' else ''}"
        console.print(latency_table([r.row() for r in runs], title=f"{name} at {args.img_size} px, {args.threads} thread(s)"))
        for batch in sorted({r.batch for r in runs}):
            ort, eager = (next(r for r in runs if r.batch == batch and r.backend == b) for b in ("ort", "torch"))
            stats = {c["stat"]: c for c in compare(eager.engine, ort.engine, names=("torch", "ort"))}
            rows.append({"model": name, "batch": batch, "threads": args.threads,
                         "ort_median_ms": ort.engine.median, "torch_median_ms": eager.engine.median,
                         "ort_p99_ms": ort.engine.p99, "torch_p99_ms": eager.engine.p99,
                         "preprocess_ms": ort.preprocess.mean,
                         "ratio": stats["throughput_ips"]["speedup"],
                         "ratio_with_preprocess": ort.row()["end_to_end_ips"] / eager.row()["end_to_end_ips"],
                         "unstable": ort.engine.unstable or eager.engine.unstable})
    console.print(rows_table(rows, title="ONNX Runtime vs PyTorch eager: ratio = how many times more images/s ORT serves"))
    write_rows(args.out, rows)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
