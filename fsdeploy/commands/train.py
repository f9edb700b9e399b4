"""Training commands: `fsdeploy pretrain` (thin CLI over fsdeploy.train.pretrain)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fsdeploy.commands.output import out_console
from fsdeploy.commands.aliases import renamed

console = out_console()


def pretrain_command(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. efficientnet_b0 (the demo default) or resnet18.")],
    data: Annotated[Path, typer.Option("--data", help="A glyph corpus folder from `fsdeploy data glyphs` (needs splits.json); with --recipe idmm any folder of images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Backbone checkpoint to write (.safetensors, no classifier head).")],
    split: Annotated[str, typer.Option(help="Which split's classes to train on: base (default), val or novel.")] = "base",
    img_size: Annotated[int, typer.Option(help="Training and inference side in pixels (32 trains fast on CPU).")] = 32,
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch", min=1, help="Images per optimiser step.")] = 128,
    lr: Annotated[Optional[float], typer.Option(help="AdamW peak learning rate (linear warm-up, then cosine to 0); default 2e-3, idmm 5e-4.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (supervised: not on norms and biases); default 0.05, idmm 1e-3.")] = None,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.1,
    warmup_epochs: Annotated[float, typer.Option(min=0.0, help="Linear learning-rate warm-up, in epochs (ViTs from scratch need several: DeiT uses 5).")] = 0.5,
    aug_scale: Annotated[float, typer.Option(help="Random resized crop drops up to this share of the area (0 = off).")] = 0.25,
    aug_rotation: Annotated[float, typer.Option(help="Random rotation up to +- this many degrees (0 = off).")] = 10.0,
    holdout: Annotated[int, typer.Option(help="Typefaces per class held out to report accuracy each epoch.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, hold-out choice, order and augmentation.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    fp16: Annotated[bool, typer.Option(help="Store the checkpoint in float16 (half the size; loads as float32).")] = True,
    resume: Annotated[bool, typer.Option(help="Continue from <out>.resume.pt, written after every epoch.")] = False,
    precision: Annotated[str, typer.Option(help="Training compute: fp32, or bf16 (autocast; pays off on AMX CPUs and GPUs at larger images, not at 32 px).")] = "fp32",
    channels_last: Annotated[bool, typer.Option(help="NHWC activations (measured 2.1x faster efficientnet_b0 steps at 32 px on this CPU).")] = True,
    recalibrate_bn: Annotated[bool, typer.Option(help="At the end, re-estimate BatchNorm statistics on the training images without augmentation (precise BN).")] = True,
    init: Annotated[Optional[Path], typer.Option(help="Start from these backbone weights (a checkpoint of MODEL, e.g. an earlier pretrain or an IDMM run); the classifier head starts fresh. Default: timm's random init.")] = None,
    recipe: Annotated[str, typer.Option(help="supervised (base-class labels, the default) or idmm (instance discrimination on a folder of unlabelled images: --data DIR, any layout).")] = "supervised",
    cutmix_alpha: Annotated[float, typer.Option(help="idmm: CutMix Beta(α, α) parameter.")] = 0.5,
    crops: Annotated[str, typer.Option(help="idmm: global,local crop counts per image (scales 0.14-1 and 0.05-0.4).")] = "2,4",
    max_steps: Annotated[Optional[int], typer.Option(help="idmm: stop after this many steps (smoke runs).")] = None,
) -> None:
    """Pretrain a backbone on the base classes of a glyph corpus, for few-shot use on novel classes.

    Plain supervised cross-entropy through a temporary linear head, with glyph-friendly augmentation (mild random resized crop and rotation, no flips). The head is then dropped and the backbone saved with its preprocessing, so `fsdeploy export MODEL --checkpoint OUT` uses it directly. Training state is kept after every epoch: rerun with --resume after an interruption.

    Examples:

      fsdeploy data glyphs --out data/glyphs

      fsdeploy pretrain efficientnet_b0 --data data/glyphs --out weights.safetensors --epochs 6 --threads 2

      fsdeploy export efficientnet_b0 --checkpoint weights.safetensors --out bundle/

      fsdeploy pretrain vit_tiny_patch16_224 --recipe idmm --data unlabelled_images/ --img-size 32 --out vit.safetensors

      fsdeploy pretrain vit_tiny_patch16_224 --init vit.safetensors --data data/glyphs --img-size 32 --out vit_ft.safetensors
    """
    if recipe == "idmm":  # IDMM (Cao et al., ECCV 2022): fsdeploy.train.idmm
        if init is not None:
            from fsdeploy.errors import InvalidInput

            raise InvalidInput("--init applies to the supervised recipe; IDMM starts from timm's init "
                               "(run IDMM first, then `pretrain --init` on its output to fine-tune it)")
        from fsdeploy.commands.idmm import run_idmm

        return run_idmm(model=model, data=data, out=out, img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, label_smoothing=label_smoothing, cutmix_alpha=cutmix_alpha, crops=crops,
                        max_steps=max_steps, seed=seed, device=device, threads=threads, fp16=fp16)
    if recipe != "supervised":
        from fsdeploy.errors import InvalidInput

        raise InvalidInput(f"--recipe {recipe!r} is not one of supervised, idmm")
    lr = 2e-3 if lr is None else lr
    weight_decay = 0.05 if weight_decay is None else weight_decay
    from fsdeploy.train.pretrain import EpochStats, PretrainConfig, pretrain

    cfg = PretrainConfig(
        model=model, data=data, out=out, split=split, img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, label_smoothing=label_smoothing, max_scale_loss=aug_scale, max_rotation_deg=aug_rotation, holdout_per_class=holdout, seed=seed, fp16=fp16,
        warmup_epochs=warmup_epochs, device=device, threads=threads, resume=resume, precision=precision, channels_last=channels_last,
        recalibrate_bn=recalibrate_bn, init=init,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"))
    table = Table(title=f"pretraining {model} on {split} classes of {data}")
    for col in ("epoch", "train loss", "train acc", "held-out acc", "lr", "s"):
        table.add_column(col, justify="right")
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("loading images", total=None, loss=float("nan"))

        def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
            bar.update(task, description=f"epoch {epoch}/{epochs}", completed=step, total=steps, loss=loss)

        def on_epoch(s: EpochStats) -> None:
            bar.console.print(
                f"epoch {s.epoch}: loss {s.train_loss:.3f}, train acc {s.train_accuracy:.3f}, "
                f"held-out acc {s.heldout_accuracy:.3f} ({s.seconds:.0f} s)"
            )
            table.add_row(str(s.epoch), f"{s.train_loss:.3f}", f"{s.train_accuracy:.3f}", f"{s.heldout_accuracy:.3f}",
                          f"{s.lr:.2e}", f"{s.seconds:.0f}")

        result = pretrain(cfg, on_step=on_step, on_epoch=on_epoch)
    console.print(table)
    if result.recalibrated_heldout is not None:
        console.print(f"held-out acc after re-estimating BatchNorm statistics: {result.recalibrated_heldout:.3f}")
    console.print(
        f"wrote {result.checkpoint}: {result.classes} classes, {result.train_images} training / {result.heldout_images} "
        f"held-out images, data sha256 {result.data_sha256[:16]}, {result.seconds / 60:.1f} min"
        + (f" (resumed after epoch {result.resumed_from_epoch})" if result.resumed_from_epoch else "")
    )


def register(app: typer.Typer) -> None:
    """Add the training commands to `app`."""
    app.command("pretrain", cls=renamed({"--batch-size": "--batch"}))(pretrain_command)
    from fsdeploy.train.metatrain_cli import register_metatrain
    from fsdeploy.train.toast_cli import register_toast

    register_metatrain(app)
    register_toast(app)
