"""`fsdeploy toast-pretune` and `fsdeploy toast-tune`: the two stages of TOAST for a frozen ViT (thin CLI over
`pretune_toast` / `tune_toast`). Defaults are the released recipe; each deviation is a named option."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _run(stage: str, model: str, options: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from fsdeploy.train.toast import pretune_toast, tune_toast

    console = Console()
    with Progress(TextColumn(f"{stage} TOAST"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(stage, total=None, loss="-")

        def report(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}")

        fn = pretune_toast if stage == "pre-tuning" else tune_toast
        result = fn(model, progress=report, **options)
    table = Table(title=f"TOAST {stage} on {model}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("classes", str(len(result.classes)))
    table.add_row("trainable top-down parameters", f"{result.trainable_params:,}")
    table.add_row("train loss before -> after", f"{result.initial_loss:.4f} -> {result.final_loss:.4f}")
    table.add_row("train accuracy", f"{result.train_accuracy:.1%}")
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
    if stage == "tuning" and options.get("pretuned") is None:
        console.print("note: started from a fresh top-down init; the released recipe pre-tunes first (fsdeploy toast-pretune, then --pretuned)")


def register_toast(app: typer.Typer) -> None:
    """Add the `toast-pretune` and `toast-tune` commands to `app`."""

    @app.command("toast-pretune")
    def toast_pretune(
        model: str = typer.Argument(..., help="timm ViT name, e.g. vit_small_patch16_224 (TOAST needs a vit_* model)."),
        data: Path = typer.Option(..., "--data", help="Generic labelled folder (e.g. the base classes): one sub-folder per class."),
        out: Path = typer.Option(Path("toast_pretuned.safetensors"), "--out", help="Where to write the pre-tuned checkpoint (.safetensors)."),
        checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Frozen backbone weights (.pth/.safetensors)."),
        pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights for the backbone (needs network)."),
        img_size: int | None = typer.Option(None, "--img-size", help="Input side in pixels (default: the model's)."),
        epochs: int = typer.Option(100, help="Passes over the folder (released: 100)."),
        warmup_epochs: int = typer.Option(10, help="Linear warm-up epochs before the cosine decay (released: 10)."),
        lr: float = typer.Option(0.01, help="Peak learning rate (released config default 0.01)."),
        optimizer: str = typer.Option("sgd", help="sgd (released, momentum 0.9) or adamw (fsdeploy's earlier recipe)."),
        weight_decay: float = typer.Option(1e-4, help="Weight decay (released 1e-4; not on the head's bias)."),
        batch_size: int = typer.Option(32, "--batch", "--batch-size", min=1, help="Images per step (--batch-size: the old spelling)."),
        augment: bool = typer.Option(True, "--augment/--no-augment", help="RandomCrop from the resized image (released)."),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips (released); --no-flip for glyphs/text, where mirrored letters are other classes."),
        drop_path: float = typer.Option(0.1, help="Stochastic depth in the frozen blocks while training (released 0.1; 0 = off)."),
        value_path: str = typer.Option("released", help="released: qkv(td)[2] with the value bias; learned: fsdeploy's bias-free learned value map."),
        decoder_init: str = typer.Option("trunc_normal", help="trunc_normal (std 0.02, released) or identity (feedback identity, value map zero)."),
        recon_weight: float = typer.Option(0.1, help="Weight of the variational loss summed over blocks (released 0.1)."),
        seed: int = typer.Option(0, help="Seed for initialisation, shuffling, augmentation and drop path."),
        device: str = typer.Option("cpu", help="Torch device: cpu or cuda."),
    ) -> None:
        """Pre-tune TOAST's top-down path on a generic labelled folder; the ViT stays frozen.

        The released top-down models are pre-tuned on ImageNet before any downstream task; here a folder of base classes stands in. The decoders and task vector learn (selector frozen) from one head's cross-entropy on both passes plus 0.1 x the variational loss summed over blocks. Pass the result to `toast-tune --pretuned`.

        Example: fsdeploy toast-pretune vit_small_patch16_224 --data glyphs/base --checkpoint vit_s.safetensors --out pretuned.safetensors --no-flip
        """
        _run("pre-tuning", model, dict(
            data_dir=data, out=out, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size, epochs=epochs,
            warmup_epochs=warmup_epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay, batch_size=batch_size,
            augment=augment, flip=flip, drop_path=drop_path, value_path=value_path, decoder_init=decoder_init,
            recon_weight=recon_weight, seed=seed, device=device,
        ))

    @app.command("toast-tune")
    def toast_tune(
        model: str = typer.Argument(..., help="timm ViT name, e.g. vit_small_patch16_224 (TOAST needs a vit_* model)."),
        data: Path = typer.Option(..., "--data", help="Labelled folder: one sub-folder of images per class."),
        out: Path = typer.Option(Path("toast.safetensors"), "--out", help="Where to write the TOAST checkpoint (.safetensors)."),
        checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Frozen backbone weights (.pth/.safetensors)."),
        pretrained: bool = typer.Option(False, "--pretrained", help="Use timm's hub weights for the backbone (needs network)."),
        pretuned: Path | None = typer.Option(None, "--pretuned", help="Start from this toast-pretune checkpoint (released: always pre-tuned first)."),
        img_size: int | None = typer.Option(None, "--img-size", help="Input side in pixels (default: the model's)."),
        epochs: int = typer.Option(100, help="Passes over the folder (released: 100)."),
        warmup_epochs: int = typer.Option(10, help="Linear warm-up epochs before the cosine decay (released: 10)."),
        lr: float = typer.Option(0.01, help="Peak learning rate (released config default 0.01; its per-dataset runs use 0.01-0.03)."),
        head_lr: float | None = typer.Option(None, help="Separate learning rate for the throw-away head (default: --lr, as released)."),
        optimizer: str = typer.Option("sgd", help="sgd (released, momentum 0.9) or adamw (fsdeploy's earlier recipe)."),
        weight_decay: float = typer.Option(1e-4, help="Weight decay (released 1e-4; not on the head's bias)."),
        batch_size: int = typer.Option(32, "--batch", "--batch-size", min=1, help="Images per step (--batch-size: the old spelling)."),
        augment: bool = typer.Option(True, "--augment/--no-augment", help="RandomCrop from the resized image (released)."),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips (released); --no-flip for glyphs/text, where mirrored letters are other classes."),
        drop_path: float = typer.Option(0.1, help="Stochastic depth in the frozen blocks while training (released 0.1; 0 = off)."),
        lite_rank: int = typer.Option(0, help="0: full TOAST; r > 0: TOAST-Lite, rank-r LoRA on the decoders (released r=4)."),
        lora_alpha: float = typer.Option(1.0, help="TOAST-Lite's LoRA update is scaled by alpha / r (loralib's default 1, as released)."),
        value_path: str = typer.Option("released", help="released: qkv(td)[2] with the value bias; learned: fsdeploy's bias-free learned value map."),
        decoder_init: str = typer.Option("trunc_normal", help="Without --pretuned: trunc_normal (std 0.02, released) or identity (feedback identity, value map zero)."),
        train_selector: bool | None = typer.Option(None, "--train-selector/--freeze-selector", help="Override the released choice: selector frozen in TOAST, trained in TOAST-Lite."),
        recon_weight: float = typer.Option(0.0, help="Weight of the summed variational loss (the released ViT path tunes downstream without it: 0)."),
        seed: int = typer.Option(0, help="Seed for initialisation, shuffling, augmentation and drop path."),
        device: str = typer.Option("cpu", help="Torch device for tuning: cpu or cuda."),
    ) -> None:
        """Tune TOAST (top-down attention steering) on a labelled folder; the ViT itself stays frozen.

        TOAST runs the ViT twice: the first pass picks task-relevant tokens, a learned feedback path sends them down and adds them to every block's attention values, and the second pass gives the feature. Only that path learns (cross-entropy with a throw-away linear head), so the checkpoint is small. Defaults are the released recipe: SGD momentum 0.9, weight decay 1e-4, lr 0.01, 10 warm-up epochs then cosine (per epoch), 100 epochs, batch 32, RandomCrop + horizontal flip, drop path 0.1, starting from a pre-tuned top-down path (--pretuned). Export the two-pass network with the checkpoint afterwards and fit per-task heads on its features.

        Example: fsdeploy toast-tune vit_small_patch16_224 --data train_images/ --checkpoint vit_s.safetensors --pretuned pretuned.safetensors --out toast.safetensors --lite-rank 4 --no-flip
        """
        _run("tuning", model, dict(
            data_dir=data, out=out, checkpoint=checkpoint, pretrained=pretrained, pretuned=pretuned, img_size=img_size,
            epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, head_lr=head_lr, optimizer=optimizer, weight_decay=weight_decay,
            batch_size=batch_size, augment=augment, flip=flip, drop_path=drop_path, lite_rank=lite_rank, lora_alpha=lora_alpha,
            value_path=value_path, decoder_init=decoder_init, train_selector=train_selector, recon_weight=recon_weight,
            seed=seed, device=device,
        ))
