"""INT8 command: quantize a bundle's features graph for ONNX Runtime on CPU, and show what it cost and gained."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()

# Below this per-image cosine the int8 features may change predictions: say so rather than judge silently.
CLOSE_COSINE = 0.99


def _report_table(report: dict, latency: dict) -> Table:
    table = Table(title=f"INT8 vs FP32 ({report['graph']}, ONNX Runtime {report['onnxruntime']})")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("calibration images", str(report["calibration_images"]))
    table.add_row("compared on", f"{report['validation_images']} {report['validated_on']} images")
    colour = "green" if report["cosine_min"] >= CLOSE_COSINE else "yellow"
    table.add_row("feature cosine min / mean", f"[{colour}]{report['cosine_min']:.4f}[/{colour}] / {report['cosine_mean']:.4f}")
    table.add_row("max |diff| (max |FP32|)", f"{report['max_abs']:.3g} ({report['ref_max_abs']:.3g})")
    fp32, int8 = latency["fp32"].median, latency["int8"].median
    table.add_row(f"batch-1 median, {latency['fp32'].n} runs each", f"FP32 {fp32:.2f} ms, INT8 {int8:.2f} ms")
    table.add_row("speed-up FP32 / INT8", f"{fp32 / int8:.2f}x")
    table.caption = report["scheme"] + (", 7-bit weights" if report["reduce_range"] else "")
    return table


def register(app: typer.Typer) -> None:
    """Add quantize to `app`."""

    @app.command()
    def quantize(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder exported with --adapter none.")],
        calib_dir: Annotated[
            Path, typer.Argument(help="Real images like those the model will serve (searched recursively; class folders are fine).")
        ],
        images: Annotated[int, typer.Option(min=1, help="Calibrate on at most this many; up to a quarter of the folder is held out to check agreement.")] = 64,
        reduce_range: Annotated[
            bool, typer.Option("--reduce-range/--full-range", help="7-bit weights (default): the u8 x s8 kernels of CPUs without VNNI saturate on full-range weights (measured: efficientnet_b0 cosine 0.18 full-range vs 0.97 reduced; resnet18 no slower).")
        ] = True,
        threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for the latency comparison (default: all cores).")] = None,
        iters: Annotated[int, typer.Option(min=1, help="Timed batch-1 runs per precision.")] = 10,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report and median latencies as one JSON object instead of the table.")] = False,
    ) -> None:
        """Add an INT8 features graph to a bundle for ONNX Runtime on CPU; print agreement with FP32 and speed.

        Activation ranges come from your images (static quantization), so use images like the ones you will classify. The bundle id does not change, so existing tasks keep working; serve with --precision int8.

        Agreement depends on the model (resnet18 keeps cosine about 0.998, efficientnet_b0 less): check it before serving. Re-running replaces the INT8 graph.

        Example: fsdeploy quantize bundle/ photos/ then fsdeploy predict bundle/ task.npz img.jpg --precision int8
        """
        from fsdeploy.bench.measure import time_precisions
        from fsdeploy.bundle import load_bundle
        from fsdeploy.pipeline.quantize import quantize_bundle

        b = load_bundle(bundle)
        from fsdeploy.commands.progress import progress

        with progress(console, "quantizing") as status:
            report = quantize_bundle(b, [calib_dir], max_images=images, reduce_range=reduce_range, say=lambda m: status.update(m))
            status.update("timing FP32 and INT8 side by side")
            latency = time_precisions(load_bundle(bundle, verify=False), iters=iters, threads=threads)
        if as_json:
            import json

            typer.echo(json.dumps({**report.to_dict(), "path": str(bundle / report.file),
                                   "fp32_median_ms": latency["fp32"].median, "int8_median_ms": latency["int8"].median}, sort_keys=True))
            return
        console.print(_report_table(report.to_dict(), latency))
        if report.cosine_min < CLOSE_COSINE and not report.reduce_range:
            console.print("[yellow]agreement is low: CPUs without VNNI saturate in full-range int8 kernels; re-run without --full-range[/yellow]")
        if report.validated_on == "calibration":
            console.print("[yellow]agreement was measured on the calibration images themselves; pass 16 or more images for a held-out check[/yellow]")
        console.print(f"wrote {bundle / report.file}; serve it with --precision int8 (adapt, predict)")
