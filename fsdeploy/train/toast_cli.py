"""`fsdeploy toast-tune`: tune TOAST's top-down attention path for a frozen ViT (thin CLI over `tune_toast`)."""
from __future__ import annotations

from pathlib import Path
import typer


def register_toast(app: typer.Typer) -> None:
    """Add the `toast-tune` command to `app`."""

    @app.command("toast-tune")
    def toast_tune(
        model: str = typer.Argument(..., help="timm ViT name, e.g. vit_small_patch16_224 (TOAST needs a vit_* model)."),
        data: Path = typer.Option(..., "--data", help="Labelled folder: one sub-folder of images per class."),
        out: Path = typer.Option(Path("toast.safetensors"), "--out", help="Where to write the TOAST checkpoint (.safetensors)."),
        checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Frozen backbone weights (.pth/.safetensors)."),
        pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights for the backbone (needs network)."),
        img_size: int | None = typer.Option(None, "--img-size", help="Input side in pixels (default: the model's)."),
        epochs: int = typer.Option(10, help="Passes over the folder."),
        lr: float = typer.Option(1e-3, help="AdamW peak learning rate (warm-up 10% of steps, then cosine to 0)."),
        head_lr: float | None = typer.Option(None, help="Learning rate of the throw-away linear head (default: 10 x --lr)."),
        weight_decay: float = typer.Option(1e-4, help="AdamW weight decay on the top-down matrices."),
        batch_size: int = typer.Option(32, help="Images per step."),
        lite_rank: int = typer.Option(0, help="0: full TOAST; r > 0: TOAST-Lite, rank-r LoRA on the feedback path."),
        recon_weight: float = typer.Option(0.0, help="Weight of the paper's reconstruction regulariser (0.1 in the paper's pre-tuning; 0 = off)."),
        seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
        device: str = typer.Option("cpu", help="Torch device for tuning: cpu or cuda."),
    ) -> None:
        """Tune TOAST (top-down attention steering) on a labelled folder; the ViT itself stays frozen.

        TOAST runs the ViT twice: the first pass picks task-relevant tokens, a learned feedback path sends them down and adds them to every block's attention values, and the second pass gives the feature. Only that path learns (cross-entropy with a throw-away linear head), so the checkpoint is small. Export the two-pass network with the checkpoint afterwards and fit per-task heads on its features.

        Example: fsdeploy toast-tune vit_small_patch16_224 --data train_images/ --checkpoint vit_s.safetensors --out toast.safetensors --epochs 5 --lite-rank 4
        """
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.table import Table

        from fsdeploy.train.toast import tune_toast

        console = Console()
        with Progress(TextColumn("tuning TOAST"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                      TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("tune", total=None, loss="-")

            def report(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=f"{loss:.3f}")

            result = tune_toast(
                model, data, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size, epochs=epochs, lr=lr, head_lr=head_lr,
                weight_decay=weight_decay, batch_size=batch_size, lite_rank=lite_rank, recon_weight=recon_weight,
                seed=seed, device=device, out=out, progress=report,
            )
        table = Table(title=f"TOAST on {model}")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_row("classes", str(len(result.classes)))
        table.add_row("trainable top-down parameters", f"{result.trainable_params:,}")
        table.add_row("train loss before -> after", f"{result.initial_loss:.4f} -> {result.final_loss:.4f}")
        table.add_row("train accuracy", f"{result.train_accuracy:.1%}")
        table.add_row("checkpoint", str(result.checkpoint))
        console.print(table)
