"""Triton serving throughput on this machine: 1, 4 and 16 concurrent clients, one image per request.

For each model (resnet18 plain, efficientnet_b0 with CaSE), a bundle is exported (or reused), three tasks
are adapted on real photo crops, the repository is written (`fsdeploy triton export`, Python backend)
and served on 127.0.0.1 by the PyTriton server; `fsdeploy.serving.load.run_load` then drives it. Local
`predict` on one image per call (the same images, tasks and engines) is the baseline, twice: as
`predict_images` (engines opened per call, like `fsdeploy predict`) and warm (engines opened once). Every served
answer's top-1 is checked against local predict. Server-side, the features model's executions per batch
size show the dynamic batching.

Needs the serving venv: `bash scripts/triton_env.sh`.

Usage:
    python benchmarks/triton_throughput.py [--img-size 224] [--clients 1,4,16] [--requests 400]

Writes benchmarks/results/triton_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fsdeploy.bench.workspace import photo_folder, pick_weights, prepare_bundle
from fsdeploy.data.images import load_checked
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.runtime import feature_path
from fsdeploy.serving import Client, TritonServer, write_repository
from fsdeploy.serving.load import run_load
from fsdeploy.runtime import adapt_task, predict_images

RESULTS = Path(__file__).parent / "results"


def bench_model(model: str, adapter: str, args: argparse.Namespace, console: Console) -> list[dict]:
    work = args.workdir
    bundle = prepare_bundle(work, model, adapter=adapter, img_size=args.img_size,
                            weights=pick_weights(model, work, args.img_size, adapter=adapter), say=console.print)
    tasks, pool, local, warm = {}, [], [], []
    path = feature_path(bundle)  # the warm baseline: engines opened once, one image per call
    for i in range(3):
        support = photo_folder(work, f"triton_support_{i}", classes=4, per_class=5, seed=10 + i)
        query = photo_folder(work, f"triton_query_{i}", classes=4, per_class=2, seed=20 + i)
        task, _ = adapt_task(bundle, support, work / f"triton_{model}_{adapter}_{i}.npz", head="linear")
        tasks[f"task{i}"] = work / f"triton_{model}_{adapter}_{i}.npz"
        files = sorted(query.rglob("*.jpg"))
        for f in files:
            s = time.perf_counter()
            ref = predict_images(bundle, task, [f])[0]
            local.append((time.perf_counter() - s) * 1e3)
            pool.append((f.read_bytes(), f"task{i}", ref.labels[0]))
            head = TaskModel.from_state(task.model_state)
            s = time.perf_counter()
            head.predict_proba(path.query(load_checked([f], bundle.manifest.preprocess), task.task_state))
            warm.append((time.perf_counter() - s) * 1e3)
    path.close()
    repo = write_repository(bundle.path, [f"{k}={v}" for k, v in tasks.items()], work / f"triton_repo_{model}_{adapter}",
                            max_batch=args.max_batch, threads=args.threads).path
    rows = []
    with TritonServer(repo, log=work / f"triton_{model}_{adapter}.log") as server, Client(server.url) as c:
        run_load(server.url, [(b, t) for b, t, _ in pool], clients=2, per_client=10)  # warm-up
        for clients in args.clients:
            before = c.batch_stats("features")
            answers: list = []
            res = run_load(server.url, [(b, t) for b, t, _ in pool], clients=clients,
                           per_client=max(1, args.requests // clients), answers=answers)
            after = c.batch_stats("features")
            batches = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) > before.get(k, 0)}
            wrong = sum(a.labels[0] != pool[j][2] for j, _, a in answers)
            execs = sum(batches.values())
            rows.append({
                "model": model, "adapter": adapter, "img_size": args.img_size, "clients": clients,
                "requests": len(res.samples_ms), "errors": len(res.errors), "top1_mismatch": wrong,
                "throughput_per_s": round(res.throughput, 1), "p50_ms": round(res.percentile(50), 2),
                "p99_ms": round(res.percentile(99), 2),
                "mean_batch": round(sum(k * v for k, v in batches.items()) / execs, 2) if execs else None,
                "local_predict_per_s": round(1e3 / float(np.mean(local)), 1),
                "local_p50_ms": round(float(np.percentile(local, 50)), 2),
                "local_warm_per_s": round(1e3 / float(np.mean(warm)), 1),
                "local_warm_p50_ms": round(float(np.percentile(warm, 50)), 2),
            })
            console.print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=400, help="requests per client count (split over the clients)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads in the features model")
    parser.add_argument("--workdir", type=Path, default=Path("runs/triton"))
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_throughput.json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    console = Console(width=120)
    rows = bench_model("resnet18", "none", args, console) + bench_model("efficientnet_b0", "case", args, console)
    table = Table(title=f"Triton (PyTriton server, Python backend, CPU) vs local predict, {args.img_size} px, 1 image/request")
    for col in ("model", "clients", "req/s", "p50 ms", "p99 ms", "mean batch", "local req/s", "warm req/s", "errors"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['model']}{' +CaSE' if r['adapter'] == 'case' else ''}", str(r["clients"]), f"{r['throughput_per_s']:.1f}",
                      f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["mean_batch"]), f"{r['local_predict_per_s']:.1f}",
                      f"{r['local_warm_per_s']:.1f}", str(r["errors"] + r["top1_mismatch"]))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
