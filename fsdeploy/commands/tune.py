"""`fsdeploy tune`: pick the engine and precision for this machine from speed and agreement on your images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from fsdeploy.commands.aliases import renamed
from fsdeploy.commands.output import out_console

console = out_console()


def tune_table(record: dict[str, Any]) -> Table:
    """The tuning evidence: one row per engine x precision, the chosen one marked."""
    gate = record["gate"]
    cal = record.get("calibration", {})
    table = Table(title=f"tuned at batch {record['batch']}: {record['backend']} {record['precision']}")
    for col, just in (("engine", "left"), ("ms/call", "right"), ("centred cos min/mean", "right"), ("agree %", "right"),
                      ("raw cos", "right"), ("gate", "left")):
        table.add_column(col, justify=just)
    for r in record["rows"]:
        name = f"{r['backend']} {r['precision']}" + (" *" if r["chosen"] else "")
        if r["status"] != "ok":
            table.add_row(name, "-", "-", "-", "-", "n/a")
            continue
        a = r["agreement"]
        table.add_row(
            name, f"{r['median_ms']:.2f}", f"{a['centred_cosine_min']:.4f} / {a['centred_cosine_mean']:.4f}",
            f"{100 * a['decision_agreement']:.2f}", f"{a['raw_cosine_min']:.4f}",
            "reference" if (r["backend"], r["precision"]) == ("ort", "fp32") else ("pass" if r["passed"] else "fail"),
        )
    table.caption = (
        f"* chosen: fastest passing. Gate: agreement >= {100 * gate['min_agreement']:.1f}% and mean centred cosine >= "
        f"{gate['min_centred_cosine']:g}, vs ort fp32 on {cal.get('images', '?')} images, {cal.get('episodes', '?')} "
        f"{cal.get('ways', '?')}-way {cal.get('shots', '?')}-shot episodes"
    )
    return table


def unavailable_lines(record: dict[str, Any]) -> list[str]:
    """Why each n/a row could not run, one line each (kept out of the table so it stays 80 columns wide)."""
    return [f"n/a {r['backend']} {r['precision']}: {r['reason']}" for r in record["rows"] if r["status"] != "ok"]


def print_tuned(record: dict[str, Any]) -> None:
    console.print(tune_table(record))
    for line in unavailable_lines(record):
        console.print(line, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `tune` to `app`."""

    @app.command(cls=renamed({}))  # hides the old positional CALIB_DIR from the usage line
    def tune(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
        calib_dir: Annotated[Optional[Path], typer.Argument(hidden=True, help="Former spelling of --calib.")] = None,
        calib: Annotated[Optional[Path], typer.Option(help="Your images, one sub-folder per class (e.g. 10 classes x 20 images).")] = None,
        batch: Annotated[int, typer.Option(help="Images per query call to time (1: single requests; 16: batches).")] = 1,
        min_agreement: Annotated[float, typer.Option(help="Share of few-shot decisions that must equal FP32's (0-1).")] = 0.99,
        min_centred_cosine: Annotated[
            float, typer.Option(help="Mean centred cosine to FP32 the features must reach (features minus the set's mean).")
        ] = 0.9,
        shots: Annotated[int, typer.Option(help="Support images per class in each episode.")] = 5,
        ways: Annotated[int, typer.Option(help="Classes per episode (fewer if the folder has fewer).")] = 5,
        episodes: Annotated[int, typer.Option(help="Episodes decision agreement is counted over.")] = 50,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads per engine (default: each engine's own).")] = None,
        iters: Annotated[int, typer.Option(help="Timed query calls per engine (split into 4 interleaved rounds).")] = 20,
        record: Annotated[bool, typer.Option(help="Store the choice in the bundle manifest (adapt/predict then use it).")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    ) -> None:
        """Measure every engine x precision available here on your images; record the fastest that agrees with FP32.

        Candidates: ort fp32 (the reference) and int8 (after `fsdeploy quantize`), openvino fp32, bf16 and bf16-mixed
        (CPUs with AVX512-BF16 or AMX; bf16-mixed keeps the high-resolution layers f32) and int8, torch fp32. Each is timed on the query path at --batch (interleaved
        rounds) and compared with ort fp32: centred cosine of the features and the share of nearest-centroid
        decisions that match on few-shot episodes drawn from --calib. `adapt` and `predict` then run the
        choice unless --backend or --precision is given; `fsdeploy info` shows the table again.

        Example: fsdeploy quantize bundle/ --calib photos/ && fsdeploy tune bundle/ --calib photos/ --batch 16
        """
        from fsdeploy.bundle import load_bundle
        from fsdeploy.pipeline.tune import Gate, interleaved_timer, tune_bundle

        from fsdeploy.commands.aliases import calib_folder

        calib_dir = calib_folder(calib, calib_dir, "tune")
        b = load_bundle(bundle)
        from fsdeploy.commands.progress import progress

        with progress(console, "tuning") as status:
            rec = tune_bundle(
                b, calib_dir, batch=batch, gate=Gate(min_agreement, min_centred_cosine), threads=threads, ways=ways, shots=shots,
                episodes=episodes, timer=interleaved_timer(iters=iters), record=record, say=lambda m: status.update(m),
            )
        if as_json:
            typer.echo(json.dumps(rec.to_dict()))
            return
        print_tuned(rec.to_dict())
        console.print(f"{'recorded in' if record else 'not recorded (--no-record):'} {bundle / 'manifest.json'}; "
                      f"adapt/predict use {rec.backend} {rec.precision} unless --backend/--precision is given")
