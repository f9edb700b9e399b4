"""TensorRT commands: build engines for a bundle, compare them with ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fsdeploy.commands.output import out_console
from fsdeploy.commands.aliases import renamed

console = out_console()

TRT_FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
TrtBackendOpt = Annotated[
    str,
    typer.Option("--backend", help="Which TensorRT: tensorrt (NVIDIA TensorRT), tensorrt-rtx (TensorRT-RTX, builds on the CPU), "
                                   "or auto: FSDEPLOY_TRT_BACKEND when set, else tensorrt when installed, else tensorrt-rtx."),
]


def choose_trt(flavour: str) -> None:
    """Bind this process to the TensorRT flavour `flavour` (auto: leave the env var / installed default).

    Raises:
        InvalidInput: an unknown flavour.
    """
    import os

    from fsdeploy.engines.trt_backend import ENV_CHOICE
    from fsdeploy.errors import InvalidInput

    if flavour == "auto":
        return
    if flavour not in TRT_FLAVOURS:
        raise InvalidInput(f"--backend {flavour!r} is not a TensorRT; use auto, {', '.join(TRT_FLAVOURS)}")
    os.environ[ENV_CHOICE] = TRT_FLAVOURS[flavour]  # read by fsdeploy.engines.trt_backend before polygraphy loads

PRECISION_HELP = (
    "fp32, or fp16: the graph is first converted to FP16 as ONNX (LayerNorm, Softmax, reductions and CaSE "
    "pooling stay FP32) and written beside it, e.g. features.fp16.onnx; the engine's real layer precisions "
    "are recorded in the manifest."
)


def _graph_list(values: Optional[list[str]]) -> Optional[list[str]]:
    """`--graphs a,b --graphs c` -> [a, b, c]."""
    if not values:
        return None
    return [g.strip() for v in values for g in v.split(",") if g.strip()]


def register(app: typer.Typer) -> None:
    """Add build and compare to `app`."""

    @app.command(cls=renamed({"--batch": "--profile"}))
    def build(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder made by `fsdeploy export`.")],
        precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "fp32",
        batch: Annotated[str, typer.Option("--profile", help="Batch profile MIN:OPT:MAX the engines accept, tuned for OPT.")] = "1:8:32",
        graphs: Annotated[Optional[list[str]], typer.Option(help="Graphs to build (repeat or comma-separate; default all).")] = None,
        force: Annotated[bool, typer.Option(help="Rebuild engines that are up to date.")] = False,
        opt_level: Annotated[Optional[int], typer.Option(help="Builder optimisation level 0-5 (0 builds fastest).")] = None,
        current_gpu: Annotated[bool, typer.Option(help="TensorRT-RTX: target this machine's GPU instead of all supported ones.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line per engine record instead of the table.")] = False,
        backend: TrtBackendOpt = "auto",
    ) -> None:
        """Build a TensorRT engine for each graph of a bundle and list it, with its sha256, in the manifest.

        Uses NVIDIA TensorRT when installed, else TensorRT-RTX (pip install tensorrt-rtx polygraphy), which builds engines on the CPU without a GPU. Choose with --backend tensorrt or --backend tensorrt-rtx (without it: FSDEPLOY_TRT_BACKEND when set, then what is installed).

        Engine files are named by graph hash, TensorRT version, precision and batch profile. An engine whose graph changed, or whose file is corrupt, is rebuilt; engines for another TensorRT version are kept for the machines that have it.

        Example: fsdeploy build bundle/ --precision fp16 --profile 1:8:32
        """
        from fsdeploy.engines.build import build_bundle

        choose_trt(backend)

        from fsdeploy.commands.progress import progress

        with progress(console, "building") as status:
            records = build_bundle(
                bundle, precision=precision, batch=batch, graphs=_graph_list(graphs), force=force,
                opt_level=opt_level, current_gpu=current_gpu, progress=lambda m: status.update(m),
            )
        if as_json:
            import json

            for r in records:
                typer.echo(json.dumps(r.to_dict(), sort_keys=True))
            return
        table = Table(title=f"engines in {bundle}")
        for col in ("graph", "engine", "precision", "layers (by output type)", "batch", "build s", "MB"):
            table.add_column(col, overflow="fold")
        for r in records:
            layers = ", ".join(f"{k} {v}" for k, v in sorted(r.layer_precisions.items()))
            size_mb = (bundle / r.file).stat().st_size / 2**20
            table.add_row(r.graph, r.file, r.precision, layers, ":".join(map(str, r.batch)), f"{r.build_s:.1f}", f"{size_mb:.1f}")
        if records:
            table.caption = f"{records[0].backend} {records[0].backend_version}; layer types: {records[0].precision_source}"
        console.print(table)

    @app.command(cls=renamed({"--n": "--batch"}))
    def compare(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder with engines from `fsdeploy build`.")],
        precision: Annotated[str, typer.Option(help="Which engines to compare: fp32 or fp16.")] = "fp32",
        batch: Annotated[int, typer.Option(min=1, help="Images per batch (real photo crops); must fit the engines' batch profile.")] = 8,
        graphs: Annotated[Optional[list[str]], typer.Option(help="Graphs to compare (default all).")] = None,
        backend: TrtBackendOpt = "auto",
    ) -> None:
        """Run ONNX Runtime and TensorRT on the same inputs; print max |diff| and cosine per output (GPU only).

        Tolerance: fp32 max |diff| <= 1e-3 and cosine >= 0.9999; fp16 max |diff| <= 1e-2 + 1e-2 * max|ORT output| and cosine >= 0.999 (FP16 keeps about 3 significant digits). Exits 1 when any output is outside it.

        Example: fsdeploy compare bundle/ --precision fp16
        """
        from fsdeploy.pipeline.trt_compare import compare_bundle
        from fsdeploy.errors import ValidationFailed
        from fsdeploy.bundle import load_bundle

        choose_trt(backend)
        b = load_bundle(bundle)
        from fsdeploy.commands.progress import progress

        with progress(console, "comparing") as status:
            report = compare_bundle(b, precision=precision, n=batch, graphs=_graph_list(graphs), progress=lambda m: status.update(m))
        from fsdeploy.commands.tables import compare_table

        console.print(compare_table(report, ref="max |ORT|"))
        if not report.passed:
            w = report.worst()
            raise ValidationFailed(
                f"{w.graph}.{w.name}: TensorRT {precision} differs from ONNX Runtime by {w.max_abs:.3g} (cosine {w.cosine:.5f}); "
                f"outside the {precision} tolerance — rebuild at fp32 or check the FP16 transform"
            )
