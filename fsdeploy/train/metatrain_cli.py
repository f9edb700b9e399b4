"""`fsdeploy metatrain`: meta-train CaSE blocks on a labelled folder (thin CLI over `metatrain`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register_metatrain(app: typer.Typer) -> None:
    """Add the `metatrain` command to `app`."""

    @app.command("metatrain")
    def metatrain_command(
        model: Annotated[str, typer.Argument(help="timm model with a CaSE placement rule, e.g. efficientnet_b0 or resnet18.")],
        data: Annotated[Path, typer.Option("--data", help="Folder with one sub-folder of images per class (a glyph corpus works).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="CaSE checkpoint to write (.safetensors).")] = Path("case.safetensors"),
        split: Annotated[str, typer.Option(help="Classes to train on, from DATA/splits.json when present (base, val or novel).")] = "base",
        checkpoint: Annotated[Path | None, typer.Option(help="Frozen backbone weights (.pth/.safetensors), or a metatrain checkpoint to continue.")] = None,
        pretrained: Annotated[bool, typer.Option(help="Use timm's hub weights for the backbone (needs network).")] = False,
        img_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: the checkpoint's or the model's).")] = None,
        tasks: Annotated[int, typer.Option(help="Episodes to train on.")] = 1000,
        ways: Annotated[int, typer.Option(help="Classes per episode.")] = 5,
        shots: Annotated[int, typer.Option(help="Context (support) images per class.")] = 5,
        queries: Annotated[int, typer.Option(help="Target images per class.")] = 10,
        lr: Annotated[float, typer.Option(help="Adam learning rate at the first task; decays linearly to --lr-end.")] = 1e-3,
        lr_end: Annotated[float, typer.Option(help="Adam learning rate at the last task.")] = 1e-5,
        accumulate: Annotated[int, typer.Option(help="Tasks per optimiser step (UpperCaSE: 16).")] = 16,
        outer: Annotated[str, typer.Option(help="Outer step: upstream (official: 128-image adaptive-mode batches from context+target, summed gradients) or context-gamma (γ from the context only, targets in query mode, averaged gradients).")] = "upstream",
        head_iters: Annotated[int, typer.Option(help="Steps of the per-task linear head (UpperCaSE: 500).")] = 500,
        device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
        seed: Annotated[int, typer.Option(help="Seed for episode and head-batch draws.")] = 0,
    ) -> None:
        """Meta-train the CaSE blocks (UpperCaSE) of a frozen backbone; the backbone itself never changes.

        Each task fits a fresh zero-init linear head on the context images' features (500 Adam steps), then trains only the CaSE blocks so that this head classifies context and target images well: by default as the official code does, max(1, (context+target)//128) batches of 128 images drawn with replacement, γ recomputed from each batch, gradients summed; Adam steps after task t when t % 16 == 0 (t > 0), the learning rate decaying linearly from --lr to --lr-end. From scratch, the CaSE blocks start as upstream's (U(±1/√out), zero bias; last layer zero). BatchNorm stays in eval mode, so the backbone tensors in OUT are bit-identical to the input ones. Export the result with `fsdeploy export MODEL --adapter case --checkpoint OUT`.

        Examples:

          fsdeploy metatrain efficientnet_b0 --data data/glyphs --checkpoint weights.safetensors --out case.safetensors

          fsdeploy metatrain resnet18 --data my_images/ --split base --tasks 2000 --img-size 64
        """
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from fsdeploy.train.metatrain import HeadRecipe, TaskStats, metatrain

        console = Console()
        columns = (
            TextColumn("meta-training CaSE"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  target acc {task.fields[acc]:.1%}"),
        )
        recent: list[TaskStats] = []
        with Progress(*columns, console=console) as bar:
            job = bar.add_task("metatrain", total=tasks, loss=float("nan"), acc=float("nan"))

            def show(stats: TaskStats) -> None:
                recent.append(stats)
                window = recent[-accumulate:]
                bar.update(
                    job, completed=stats.task, loss=sum(s.loss for s in window) / len(window),
                    acc=sum(s.target_acc for s in window) / len(window),
                )

            path = metatrain(
                model, data, out, checkpoint=checkpoint, pretrained=pretrained, split=split, img_size=img_size,
                tasks=tasks, ways=ways, shots=shots, queries=queries, lr=lr, lr_end=lr_end, accumulate=accumulate,
                outer=outer, head=HeadRecipe(iters=head_iters), device=device, seed=seed, progress=show,
            )
        console.print(f"wrote {path}; export it with `fsdeploy export {model} --adapter case --checkpoint {path}`")
