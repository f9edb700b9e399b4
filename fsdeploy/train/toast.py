"""Tune TOAST's top-down path on a labelled image folder (Shi et al., "TOAST: Transfer Learning via
Attention Steering", arXiv 2305.15542).

Only the top-down parameters (task vector, selector, feedback and value maps, or their LoRA factors for
TOAST-Lite) and a throw-away linear head learn; the ViT stays frozen and bit-identical. The loss is
cross-entropy of the head on the second pass's pooled features, optionally plus the paper's
reconstruction regulariser (feedback layer l maps block l's output back to its input).

Defaults are fsdeploy's choice for small few-shot folders, not the paper's ImageNet-scale recipe:
10 epochs, batch 32, AdamW lr 1e-3 (10x for the head), weight decay 1e-4 on matrices (none on the task vector or head
bias), linear warm-up over the first 10% of steps then cosine decay to zero, no augmentation (images go
through timm's eval transform), reconstruction weight 0 (the paper applies it when pre-tuning the top-down
path on a generic dataset; pass 0.1, the released code's weight, to use it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.backbones import Preprocess, create_backbone
from fsdeploy.data.cache import ImageCache
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.errors import InvalidInput
from fsdeploy.modules.toast import TopDownViT
from fsdeploy.modules.toast_checkpoint import backbone_fingerprint, save_toast

Progress = Callable[[int, int, float], None]  # (step done, total steps, loss of that step)


@dataclass(frozen=True)
class TuneResult:
    """What `tune_toast` produced; losses are cross-entropy on the whole training folder, eval mode."""

    module: TopDownViT
    classes: tuple[str, ...]
    preprocess: Preprocess  # the eval transform the features expect
    train_images: int
    step_losses: tuple[float, ...]  # training objective per step (CE + weighted reconstruction)
    initial_loss: float  # head at init, TOAST at init (= plain ViT)
    final_loss: float
    train_accuracy: float
    trainable_params: int
    checkpoint: Path | None


def _batch(images: ImageCache, index: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(images.get(index.numpy()))


def _cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _evaluate(
    module: TopDownViT, head: nn.Linear, images: ImageCache, labels: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every image, no gradients."""
    module.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            index = torch.arange(start, min(start + batch_size, len(labels)))
            logits = head(module(_batch(images, index).to(device)))
            target = labels[index].to(device)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    return loss_sum / len(labels), correct / len(labels)


def tune_toast(
    model_name: str,
    data_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    head_lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    warmup_frac: float = 0.1,
    lite_rank: int = 0,
    recon_weight: float = 0.0,
    max_steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune a TOAST top-down path for a frozen timm ViT on `data_dir/<class>/<image>`.

    Args:
        model_name: timm ViT name, e.g. vit_small_patch16_224.
        data_dir: ImageFolder tree, one sub-folder per class (at least two).
        classes: tune on only these class folders (e.g. a corpus's base split); None: all.
        checkpoint: local backbone weights (.pth/.safetensors); None uses timm's init or `pretrained`.
        pretrained: timm hub weights (needs network).
        img_size: input side (ViTs accept e.g. 32, 64, 224); None: the checkpoint's or the model's.
        epochs: passes over the folder (10).
        lr: AdamW peak learning rate of the top-down path (1e-3), reached after warm-up, cosine-decayed to 0.
        head_lr: peak rate of the throw-away linear head; None: 10 x lr (it starts near zero and must
            catch up with the features, else the top-down path chases a head that has not learnt yet).
        weight_decay: AdamW decay on matrices (1e-4); the task vector and head bias get none.
        batch_size: images per step (32).
        warmup_frac: share of steps with linear warm-up (0.1).
        lite_rank: 0 for full TOAST, r > 0 for TOAST-Lite (rank-r LoRA on the feedback path).
        recon_weight: weight of the reconstruction regulariser (0 = off).
        max_steps: stop after this many steps (the schedule is laid out for them); None = all epochs.
        seed: seeds initialisation and shuffling (through a local generator; global RNG untouched).
        device: torch device for tuning, e.g. "cpu" or "cuda".
        out: write the checkpoint here (.safetensors); None keeps it in memory only.
        progress: called after every step with (step, total, loss).

    Raises:
        InvalidInput: bad folder, non-ViT model, bad options.
    """
    bad_rate = lr <= 0 or (head_lr is not None and head_lr <= 0)
    if epochs < 1 or batch_size < 1 or bad_rate or not 0 <= warmup_frac < 1 or recon_weight < 0 or lite_rank < 0:
        raise InvalidInput(
            f"bad tuning options (epochs={epochs}, batch_size={batch_size}, lr={lr}, head_lr={head_lr}, "
            f"warmup_frac={warmup_frac}, recon_weight={recon_weight}, lite_rank={lite_rank}); need epochs, "
            "batch_size >= 1, lr and head_lr > 0, 0 <= warmup_frac < 1, recon_weight >= 0, lite_rank >= 0"
        )
    files = scan_image_folder(data_dir, classes=list(classes) if classes is not None else None)
    backbone, preprocess = create_backbone(model_name, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size)
    fingerprint = backbone_fingerprint(backbone)
    generator = torch.Generator().manual_seed(seed)
    module = TopDownViT(backbone, lite_rank=lite_rank, generator=generator)
    head = nn.Linear(module.backbone.embed_dim, len(files.classes))
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    torch_device = torch.device(device)
    module.to(torch_device)
    head.to(torch_device)

    images = ImageCache(files.paths, preprocess)
    labels = torch.from_numpy(files.labels)
    steps_per_epoch = math.ceil(len(files) / batch_size)
    total = min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch
    head_lr = 10.0 * lr if head_lr is None else head_lr
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in module.toast_parameters() if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in module.toast_parameters() if p.ndim < 2], "weight_decay": 0.0},
            {"params": [head.weight], "weight_decay": weight_decay, "lr": head_lr},
            {"params": [head.bias], "weight_decay": 0.0, "lr": head_lr},
        ],
        lr=lr,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total, int(warmup_frac * total)))

    initial_loss, _ = _evaluate(module, head, images, labels, batch_size, torch_device)
    step_losses: list[float] = []
    module.train()
    while len(step_losses) < total:
        order = torch.randperm(len(files), generator=generator)
        for start in range(0, len(order), batch_size):
            if len(step_losses) >= total:
                break
            index = order[start : start + batch_size]
            feats, streams = module.forward_with_streams(_batch(images, index).to(torch_device), keep_streams=recon_weight > 0)
            loss = F.cross_entropy(head(feats), labels[index].to(torch_device))
            if recon_weight > 0:
                loss = loss + recon_weight * module.reconstruction_loss(streams)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(step_losses), total, step_losses[-1])
    final_loss, accuracy = _evaluate(module, head, images, labels, batch_size, torch_device)
    module.to("cpu")

    path = None
    if out is not None:
        source = f"checkpoint {Path(checkpoint).name}" if checkpoint else ("timm pretrained" if pretrained else "timm random init")
        path = save_toast(
            module,
            out,
            model_name=model_name,
            preprocess=preprocess,
            backbone_sha256=fingerprint,
            extra={
                "backbone_source": source,
                "classes": list(files.classes),
                "epochs": epochs,
                "steps": total,
                "lr": lr,
                "head_lr": head_lr,
                "weight_decay": weight_decay,
                "batch_size": batch_size,
                "recon_weight": recon_weight,
                "seed": seed,
                "train_loss": final_loss,
                "train_accuracy": accuracy,
            },
        )
    return TuneResult(
        module=module,
        classes=files.classes,
        preprocess=preprocess,
        train_images=len(files),
        step_losses=tuple(step_losses),
        initial_loss=initial_loss,
        final_loss=final_loss,
        train_accuracy=accuracy,
        trainable_params=sum(p.numel() for p in module.toast_parameters()),
        checkpoint=path,
    )
