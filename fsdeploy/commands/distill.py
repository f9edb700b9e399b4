"""`fsdeploy distill`: thin CLI over fsdeploy.train.distill (L2T-ww and its baselines)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fsdeploy.commands.output import out_console
from fsdeploy.commands.aliases import renamed

console = out_console()


def distill_command(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher: an fsdeploy checkpoint (.safetensors, model read from its metadata) or a timm name (efficientnet_b0 = the shipped glyph weights; other names need timm's hub).")],
    student: Annotated[str, typer.Option("--student", help="timm name of the student, e.g. mobilenetv3_small_050 or resnet10t.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled images: a glyph corpus (uses --split) or an ImageFolder (class folders).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Student checkpoint to write (.safetensors, no classifier head).")],
    method: Annotated[str, typer.Option(help="l2t-ww (meta-learned what/where matching), uniform (all pairs and channels equal), finetune (cross-entropy only).")] = "l2t-ww",
    split: Annotated[str, typer.Option(help="Glyph-corpus split to train on (ignored for a plain ImageFolder).")] = "base",
    img_size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the teacher's).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the images.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch", min=1, help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Student SGD learning rate (momentum 0.9, cosine over epochs).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="Student SGD weight decay.")] = 1e-4,
    beta: Annotated[float, typer.Option(help="Weight of the matching loss (β).")] = 0.5,
    meta_lr: Annotated[float, typer.Option(help="Adam learning rate of the what/where meta-networks.")] = 1e-4,
    inner_steps: Annotated[int, typer.Option(help="T: lookahead SGD steps on the matching loss per meta step.")] = 2,
    pairs: Annotated[str, typer.Option(help="(teacher layer)-(student layer) pairs over the 4 tapped stages, 0-based, e.g. 3-3,2-2; or all (16 pairs).")] = "all",
    student_checkpoint: Annotated[Optional[Path], typer.Option(help="Start the student from these weights (with --method finetune: plain fine-tuning).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (smoke runs).")] = None,
    aug_scale: Annotated[float, typer.Option(help="Random resized crop drops up to this share of the area (0 = off).")] = 0.25,
    aug_rotation: Annotated[float, typer.Option(help="Random rotation up to +- this many degrees (0 = off).")] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and batch order.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
    fp16: Annotated[bool, typer.Option(help="Store the checkpoint in float16.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Distil a teacher into a smaller student backbone with L2T-ww (Jang et al., ICML 2019), or a baseline.

    The student learns the labelled task with cross-entropy plus a feature-matching loss to the teacher over (teacher stage, student stage) pairs; meta-networks choose which channels ("what") and which pairs ("where") matter, updated by how lookahead steps on the matching loss change the task loss. The head is dropped and the student saved with the teacher's preprocessing, so `fsdeploy export STUDENT --checkpoint OUT` takes it like any backbone.

    Examples:

      fsdeploy distill --teacher efficientnet_b0 --student mobilenetv3_small_050 --data data/glyphs --out student.safetensors

      fsdeploy distill --teacher teacher.safetensors --student resnet10t --data data/glyphs --method uniform --out fm.safetensors

      fsdeploy export mobilenetv3_small_050 --checkpoint student.safetensors --out student-bundle/
    """
    from fsdeploy.train.distill import DistillConfig, StepStats, distill

    cfg = DistillConfig(teacher=teacher, student=student, data=data, out=out, method=method, split=split, img_size=img_size,
                        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, beta=beta, meta_lr=meta_lr,
                        inner_steps=inner_steps, pairs=pairs, student_checkpoint=student_checkpoint, max_steps=max_steps,
                        aug_scale=aug_scale, aug_rotation=aug_rotation,
                        seed=seed, device=device, threads=threads, fp16=fp16)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ce {task.fields[ce]:.3f} match {task.fields[match]:.3f}"))
    with Progress(*columns, console=console, disable=as_json) as bar:
        task = bar.add_task(f"{method} {student}", total=None, ce=math.nan, match=math.nan)

        def on_step(s: StepStats, total: int) -> None:
            bar.update(task, completed=s.step, total=total, ce=s.ce, match=s.matching)

        result = distill(cfg, on_step=on_step)
    last = result.history[-1] if result.history else None
    summary = {
        "checkpoint": str(result.checkpoint), "method": method, "student": student, "classes": result.classes,
        "images": result.images, "steps": len(result.history), "seconds": round(result.seconds, 1),
        "final_ce": last.ce if last else None, "final_matching": last.matching if last else None,
        "pairs": [list(p) for p in result.pairs], "pair_weights": list(result.pair_weights),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console.print(f"wrote {result.checkpoint}: {student} ({method}) on {result.images} images / {result.classes} classes, "
                  f"{len(result.history)} steps, {result.seconds / 60:.1f} min"
                  + (f"; last CE {last.ce:.3f}, matching {last.matching:.3f}" if last else ""))
    if result.pairs:
        top = sorted(zip(result.pair_weights, result.pairs), reverse=True)[:4]
        console.print("largest pair weights λ (teacher-student): " + ", ".join(f"{m}-{n} {w:.2f}" for w, (m, n) in top))


def register(app: typer.Typer) -> None:
    """Add `fsdeploy distill` to `app`."""
    app.command("distill", cls=renamed({"--batch-size": "--batch"}))(distill_command)
