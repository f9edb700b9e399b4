"""INT8 command: quantize a bundle's features graph for ONNX Runtime on CPU, and show what it cost and gained."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fsdeploy.commands.aliases import renamed
from fsdeploy.commands.output import out_console

console = out_console()

# Below this per-image cosine the int8 features may change predictions: say so rather than judge silently.
CLOSE_COSINE = 0.99


def _report_table(report: dict, latency: dict) -> Table:
    table = Table(title=f"INT8 vs FP32 ({report['graph']}, ONNX Runtime {report['onnxruntime']})")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("calibration images", str(report["calibration_images"]))
    table.add_row("compared on", f"{report['validation_images']} {report['validated_on']} images")
    colour = "green" if report["centred_cosine_min"] >= CLOSE_COSINE else "yellow"
    table.add_row("centred cosine min / mean", f"[{colour}]{report['centred_cosine_min']:.4f}[/{colour}] / {report['centred_cosine_mean']:.4f}")
    if report["agreement_decisions"]:
        table.add_row("few-shot decisions as FP32", f"{100 * report['decision_agreement']:.2f}% of {report['agreement_decisions']} "
                      f"({report['agreement_episodes']} episodes)")
    else:
        table.add_row("few-shot decisions as FP32", "n/a: needs class folders with 2+ images each")
    table.add_row("raw cosine min / mean", f"{report['cosine_min']:.4f} / {report['cosine_mean']:.4f}")
    how = "chosen for this CPU" if report["range_chosen_by"] == "cpu" else "as asked"
    table.add_row("weights", f"{'7-bit' if report['reduce_range'] else 'full-range 8-bit'} ({how}; INT8 kernels: {report['int8_kernels']})")
    table.add_row("max |diff| (max |FP32|)", f"{report['max_abs']:.3g} ({report['ref_max_abs']:.3g})")
    fp32, int8 = latency["fp32"].median, latency["int8"].median
    table.add_row(f"batch-1 median, {latency['fp32'].n} runs each", f"FP32 {fp32:.2f} ms, INT8 {int8:.2f} ms")
    table.add_row("speed-up FP32 / INT8", f"{fp32 / int8:.2f}x")
    table.caption = (report["scheme"] + (", 7-bit weights" if report["reduce_range"] else "")
                     + "; centred cosine: features minus the calibration images' mean FP32 feature")
    return table


def register(app: typer.Typer) -> None:
    """Add quantize to `app`."""

    @app.command(cls=renamed({}))  # hides the old positional CALIB_DIR from the usage line
    def quantize(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder exported with --adapter none.")],
        calib_dir: Annotated[Optional[Path], typer.Argument(hidden=True, help="Former spelling of --calib.")] = None,
        calib: Annotated[
            Optional[Path], typer.Option(help="Real images like those the model will serve (searched recursively; class folders are fine).")
        ] = None,
        images: Annotated[int, typer.Option(min=1, help="Calibrate on at most this many; up to a quarter of the folder is held out to check agreement.")] = 64,
        reduce_range: Annotated[
            Optional[bool],
            typer.Option("--reduce-range/--full-range", help="Weight range. Default: from this CPU's flags: full range where the INT8 kernels accumulate in int32 (AVX512-VNNI, AVX-VNNI, AMX-INT8, ARM dot product), 7-bit where only AVX2 (its u8 x s8 kernels saturate int16 sums on full-range weights). Serve on CPUs of the same kind."),
        ] = None,
        threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for the latency comparison (default: all cores).")] = None,
        iters: Annotated[int, typer.Option(min=1, help="Timed batch-1 runs per precision.")] = 10,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report and median latencies as one JSON object instead of the table.")] = False,
    ) -> None:
        """Add an INT8 features graph to a bundle for ONNX Runtime on CPU; print agreement with FP32 and speed.

        Activation ranges come from your images (static quantization), so use images like the ones you will classify. The bundle id does not change, so existing tasks keep working; serve with --precision int8.

        Agreement depends on the model and the CPU: the report shows centred cosine (features minus the calibration mean, which raw cosine hides) and the share of few-shot nearest-centroid decisions that match FP32 on episodes from your class folders. Check them, or let `fsdeploy tune` gate it. Re-running replaces the INT8 graph.

        Example: fsdeploy quantize bundle/ --calib photos/ then fsdeploy predict bundle/ task.npz img.jpg --precision int8
        """
        from fsdeploy.bench.measure import time_precisions
        from fsdeploy.bundle import load_bundle
        from fsdeploy.pipeline.quantize import quantize_bundle

        from fsdeploy.commands.aliases import calib_folder

        calib_dir = calib_folder(calib, calib_dir, "quantize")
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
        from fsdeploy.pipeline.int8_range import int8_kernels

        if not report.reduce_range and not int8_kernels().full_range:
            console.print(f"[yellow]full-range weights on a CPU without VNNI ({report.int8_kernels}): its u8 x s8 kernels saturate "
                          "int16 sums, so agreement may be low; re-run without --full-range[/yellow]")
        elif report.reduce_range and int8_kernels().full_range:
            console.print(f"[yellow]7-bit weights on a CPU whose INT8 kernels are exact at full range ({report.int8_kernels}): "
                          "this costs accuracy here; re-run without --reduce-range unless you serve on AVX2-only CPUs[/yellow]")
        if report.validated_on == "calibration":
            console.print("[yellow]agreement was measured on the calibration images themselves; pass 16 or more images for a held-out check[/yellow]")
        console.print(f"wrote {bundle / report.file}; serve it with --precision int8 (adapt, predict)")
