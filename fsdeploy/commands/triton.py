"""Triton commands: write a model repository from a bundle and its tasks, serve it, manage its tasks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fsdeploy.commands.output import out_console

console = out_console()

triton_app = typer.Typer(
    name="triton",
    help=(
        "Serve a bundle and many tasks on NVIDIA Triton Inference Server.\n\n"
        "`fsdeploy triton export bundle/ a.npz b.npz --out repo/` writes the model repository (a shared "
        "features model with dynamic batching, the task store, one head for every task, the `classify` "
        "ensemble, an `adapt` model); `fsdeploy triton serve repo/` runs it on 127.0.0.1. Tasks are added, "
        "replaced and removed while serving (`add-task`, `remove-task`, or the `adapt` model)."
    ),
    no_args_is_help=True,
    add_completion=False,
)


@triton_app.command("export")
def export_repo(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder from `fsdeploy export`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Repository folder to write (replaced atomically).")],
    tasks: Annotated[Optional[list[str]], typer.Argument(help="Task artefacts (.npz) to serve; each under its file stem, or ID=PATH.")] = None,
    backend: Annotated[str, typer.Option(help="Features model: python (ONNX Runtime in the Python backend; runs on the PyTriton server here), onnxruntime (platform onnxruntime_onnx), tensorrt (platform tensorrt_plan; plan built on the GPU server by models/features/build_plan.sh).")] = "python",
    device: Annotated[Optional[str], typer.Option(help="Features model device: cuda (NVIDIA GPU; onnxruntime: TensorRT FP16 accelerator) or cpu (onnxruntime: OpenVINO accelerator). Default: cpu for python, cuda otherwise. gpu is the former spelling of cuda.")] = None,
    max_batch: Annotated[int, typer.Option(help="Triton max_batch_size: most images one execution merges.")] = 32,
    topk: Annotated[int, typer.Option(help="Labels per image that classify returns (all probabilities come too).")] = 5,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batcher: longest wait for more requests, microseconds.")] = 2000,
    instances: Annotated[int, typer.Option(help="Instances per batched model (each its own process on the python backend).")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads per Python model instance (default: ORT's).")] = None,
    python_path: Annotated[Optional[list[str]], typer.Option(help="Folder the Python models put on sys.path, repeatable (default: this fsdeploy's source tree; pass '' when fsdeploy is pip-installed in the serving Python).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a Triton model repository for a bundle and its tasks.

    Example: fsdeploy triton export bundle/ pets.npz cars=task2.npz --out repo/ --max-batch 32

    For CaSE bundles the features model is the query graph with a batched γ input (N, G), checked against the bundle's query graph row by row, so requests of different tasks share one execution.
    """
    from fsdeploy.serving.repository import write_repository

    paths = None if python_path is None else [p for p in python_path if p]
    if device == "gpu":
        from fsdeploy.commands.aliases import note

        note("--device gpu", "--device cuda")  # --device gpu[:N] elsewhere is OpenVINO's Intel GPU
    elif device == "cuda":
        device = "gpu"  # Triton's KIND_GPU
    info = write_repository(bundle, tasks or [], out, backend=backend, device=device, max_batch=max_batch, topk=topk,
                            queue_delay_us=queue_delay_us, instances=instances, threads=threads, sys_path=paths)
    if as_json:
        typer.echo(json.dumps({"repository": str(info.path), "backend": info.backend, "models": list(info.models),
                               "tasks": list(info.tasks), "batched_gamma_check": info.check, "pending": list(info.pending)}))
        return
    table = Table(title=f"{info.path} ({info.backend})")
    table.add_column("model")
    table.add_column("role")
    roles = {"preprocess": "image bytes -> pixels", "task_state": "task id -> version [+ γ]", "features": "pixels [+ γ] -> features",
             "head": "features + task -> probabilities", "adapt": "support set -> new task", "classify": "ensemble: image + task id",
             "classify_pixels": "ensemble: pixels + task id"}
    for name in info.models:
        table.add_row(name, roles.get(name, ""))
    console.print(table)
    if info.check:
        console.print(f"batched-γ graph vs bundle query graph: max |diff| {info.check['max_abs']:.1e} over {info.check['rows']} rows")
    console.print(f"tasks: {', '.join(info.tasks) or '(none yet: add with `fsdeploy triton add-task` or the adapt model)'}")
    for p in info.pending:
        console.print(f"[yellow]to build on the GPU server: {p}[/yellow]")


@triton_app.command()
def serve(
    repo: Annotated[Path, typer.Argument(help="Repository from `fsdeploy triton export`.")],
    port: Annotated[Optional[int], typer.Option(help="HTTP port on 127.0.0.1 (default: a free one).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to be ready.")] = 120.0,
    log: Annotated[Optional[Path], typer.Option(help="File for the server's log (default: a temp file).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the endpoints as one JSON line once ready.")] = False,
) -> None:
    """Run tritonserver on a repository (127.0.0.1 only) until Ctrl-C.

    Uses `tritonserver` on PATH, else the one in the PyTriton wheel of .venv-triton (`bash scripts/triton_env.sh`).

    Example: fsdeploy triton serve repo/ --port 8000, then POST to http://127.0.0.1:8000/v2/models/classify/infer
    """
    import time

    from fsdeploy.serving.server import TritonServer

    with TritonServer(repo, http_port=port, log=log).start(timeout) as server:
        endpoints = {"http": f"http://{server.url}", "classify": f"http://{server.url}/v2/models/classify/infer",
                     "adapt": f"http://{server.url}/v2/models/adapt/infer", "log": str(server.log_path)}
        if as_json:
            typer.echo(json.dumps(endpoints))
        else:
            for k, v in endpoints.items():
                console.print(f"{k:9} {v}")
            console.print("serving; Ctrl-C stops")
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@triton_app.command("add-task")
def add_task_cmd(
    repo: Annotated[Path, typer.Argument(help="Repository from `fsdeploy triton export`.")],
    task: Annotated[Path, typer.Argument(help="Task artefact from `fsdeploy adapt` on the repository's bundle.")],
    task_id: Annotated[Optional[str], typer.Option("--id", help="Task id clients send (default: the file stem).")] = None,
) -> None:
    """Add (or replace) a task in a repository's store; a running server serves it on the next request."""
    from fsdeploy.errors import BundleError
    from fsdeploy.serving.roles import read_manifest
    from fsdeploy.serving.store import add_task
    from fsdeploy.runtime import TaskArtefact

    info = read_manifest(repo)
    artefact = TaskArtefact.load(task)
    if artefact.bundle_id != info["bundle_id"]:
        raise BundleError(f"task {task} was fitted on bundle {artefact.bundle_id[:12]}, not {repo}'s {info['bundle_id'][:12]}; re-adapt it on that bundle")
    if "graph" in artefact.task_state and not info.get("folded_tasks"):
        raise BundleError(f"task {task} carries a folded graph; {repo} serves one shared features graph — export with --backend python")
    path = add_task(Path(repo) / "tasks", task_id or task.stem, artefact)
    console.print(f"added {path.stem}: {len(artefact.classes)} classes -> {path}")


@triton_app.command("remove-task")
def remove_task_cmd(
    repo: Annotated[Path, typer.Argument(help="Repository from `fsdeploy triton export`.")],
    task_id: Annotated[str, typer.Argument(help="Task id to remove; its requests then get an unknown-task error.")],
) -> None:
    """Remove a task from a repository's store (a running server stops serving it at once)."""
    from fsdeploy.serving.store import remove_task

    remove_task(Path(repo) / "tasks", task_id)
    console.print(f"removed {task_id}")


def register(app: typer.Typer) -> None:
    """Add the `triton` command group to `app`."""
    app.add_typer(triton_app, name="triton")
