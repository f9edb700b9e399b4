"""Pre-tune and tune TOAST's top-down path on labelled image folders (Shi et al., "TOAST: Transfer Learning
via Attention Steering", arXiv 2305.15542; released code bfshi/TOAST `visual_classification`).

Only the top-down parameters (task vector and decoders, plus the selector for TOAST-Lite, or the LoRA factors
for TOAST-Lite's decoders) and a throw-away linear head learn; the ViT stays frozen and bit-identical.

Two stages, as released:
1. `pretune_toast`: the released top-down models are pre-tuned on ImageNet-1k before any downstream task
   (decoders and task vector learn, selector frozen); here a folder of base classes (e.g. the glyph corpus's
   base split) stands in. Loss as AbSViT's training step: the mean of the head's cross-entropy on both
   passes plus the variational loss 0.1 x sum over blocks.
2. `tune_toast`: downstream tuning from the pre-tuned checkpoint (`pretuned=`), cross-entropy of the head on
   the second pass (the released ViT path adds no variational loss downstream).

Released recipe (the defaults of both): SGD momentum 0.9, weight decay 1e-4 on every tuned tensor but the
head's bias, learning rate 0.01 (the released config default; its per-dataset commands use 0.01-0.03), linear
warm-up over 10 epochs then cosine to 0 over the run (`WarmupCosineSchedule`, stepped once per epoch, so
epoch 0 runs at lr 0 as released), 100 epochs, batch 32; training images Resize(size/crop_pct) ->
RandomCrop(size) -> horizontal flip, evaluation through timm's eval transform; stochastic depth 0.1 in the
frozen blocks; head kaiming-normal (fan_out) with bias -log(99) (the released MLP head's prior 0.01).

Named deviations: `optimizer="adamw"` (fsdeploy's earlier AdamW recipe, decay on matrices only), `flip=False`
(mirrored glyphs are other glyphs: b/d, p/q), `augment=False`, `drop_path=0`, `head_lr` (separate head rate),
and the module options of `fsdeploy.modules.toast.TopDownViT` (`value_path`, `decoder_init`,
`train_selector`, `lora_alpha`).
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
    epoch_lrs: tuple[float, ...]  # the optimiser's (first group's) learning rate during each epoch run
    initial_loss: float  # head at init, TOAST at its start (fresh init or pre-tuned)
    final_loss: float
    train_accuracy: float
    trainable_params: int
    checkpoint: Path | None


OPTIMIZERS = ("sgd", "adamw")
PRIOR_PROB = 0.01  # the released head's bias prior: bias = -log((1 - p) / p) = -log(99)


def _batch(images: ImageCache, index: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(images.get(index.numpy()))


def warmup_cosine(epoch: int, warmup_epochs: int, total_epochs: int) -> float:
    """The released `WarmupCosineSchedule.lr_lambda`: epoch/warmup during warm-up, then half a cosine to 0."""
    if epoch < warmup_epochs:
        return float(epoch) / float(max(1.0, warmup_epochs))
    progress = float(epoch - warmup_epochs) / float(max(1, total_epochs - warmup_epochs))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_head(dim: int, classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """The released classification head (MLP_NUM=0): kaiming-normal weight (fan_out, a=0), bias -log(99)."""
    head = nn.utils.skip_init(nn.Linear, dim, classes)
    with torch.no_grad():
        head.weight.normal_(0.0, math.sqrt(2.0 / classes), generator=generator)  # kaiming_normal_(mode="fan_out")
        head.bias.fill_(-math.log((1.0 - PRIOR_PROB) / PRIOR_PROB))
    return head


def make_optimizer(
    module: TopDownViT, head: nn.Linear, *, optimizer: str = "sgd", lr: float = 0.01, head_lr: float | None = None,
    weight_decay: float = 1e-4, momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The released optimiser: SGD(momentum) with weight decay on every tuned tensor except the head's bias.

    `optimizer="adamw"` is fsdeploy's earlier recipe (decay on matrices only). `head_lr` None: the head
    shares `lr` (released).
    """
    if optimizer not in OPTIMIZERS:
        raise InvalidInput(f"unknown optimizer {optimizer!r}; pick one of {', '.join(OPTIMIZERS)}")
    head_lr = lr if head_lr is None else head_lr
    tuned = list(module.toast_parameters())
    if optimizer == "sgd":
        groups = [
            {"params": tuned, "weight_decay": weight_decay, "lr": lr},
            {"params": [head.weight], "weight_decay": weight_decay, "lr": head_lr},
            {"params": [head.bias], "weight_decay": 0.0, "lr": head_lr},
        ]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    groups = [
        {"params": [p for p in tuned if p.ndim >= 2], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in tuned if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        {"params": [head.weight], "weight_decay": weight_decay, "lr": head_lr},
        {"params": [head.bias], "weight_decay": 0.0, "lr": head_lr},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def train_preprocess(preprocess: Preprocess) -> Preprocess:
    """What the random crop is drawn from: the eval transform's resize (size / crop_pct), centre square kept.

    = the released Resize(256) before RandomCrop(224); for non-square images the crop stays inside the
    central square (a cached tensor per image).
    """
    size = int(preprocess.input_size[-1])
    side = max(size, math.floor(size / preprocess.crop_pct))
    return Preprocess(input_size=(3, side, side), mean=preprocess.mean, std=preprocess.std, crop_pct=1.0,
                      interpolation=preprocess.interpolation)


def random_crop_flip(batch: torch.Tensor, size: int, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(size) then RandomHorizontalFlip(0.5), per image, drawn from `generator`."""
    n, _, h, w = batch.shape
    tops = torch.randint(0, h - size + 1, (n,), generator=generator)
    lefts = torch.randint(0, w - size + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    out = []
    for i in range(n):
        crop = batch[i, :, int(tops[i]) : int(tops[i]) + size, int(lefts[i]) : int(lefts[i]) + size]
        out.append(crop.flip(-1) if bool(flips[i]) else crop)
    return torch.stack(out)


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


def _start_from_pretuned(module: TopDownViT, pretuned: str | Path) -> dict:
    """Load a `pretune_toast` checkpoint (same backbone weights, full TOAST, same value path) into `module`."""
    from fsdeploy.modules.toast_checkpoint import load_top_down_state, read_top_down

    state, meta = read_top_down(pretuned, module.backbone)
    if int(meta.get("lite_rank", 0)) != 0 or meta.get("stage") != "pretune":
        raise InvalidInput(f"{pretuned} is not a pre-tuned TOAST checkpoint (stage={meta.get('stage')!r}); pass the file `fsdeploy toast-pretune` wrote")
    if meta.get("value_path", "learned") != module.value_path:
        raise InvalidInput(f"{pretuned} was pre-tuned with value_path={meta.get('value_path')!r}, not {module.value_path!r}; pass the same --value-path")
    load_top_down_state(module, state, pretuned)
    return meta


def _tune(
    stage: str,
    model_name: str,
    data_dir: str | Path,
    *,
    classes: Sequence[str] | None,
    checkpoint: str | Path | None,
    pretrained: bool,
    pretuned: str | Path | None,
    img_size: int | None,
    epochs: int,
    warmup_epochs: int,
    lr: float,
    head_lr: float | None,
    optimizer: str,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    augment: bool,
    flip: bool,
    drop_path: float,
    lite_rank: int,
    lora_alpha: float,
    value_path: str,
    decoder_init: str,
    train_selector: bool | None,
    recon_weight: float,
    max_steps: int | None,
    seed: int,
    device: str,
    out: str | Path | None,
    progress: Progress | None,
) -> TuneResult:
    bad_rate = lr <= 0 or (head_lr is not None and head_lr <= 0)
    if epochs < 1 or batch_size < 1 or bad_rate or warmup_epochs < 0 or recon_weight < 0 or lite_rank < 0 or not 0 <= momentum < 1:
        raise InvalidInput(
            f"bad tuning options (epochs={epochs}, batch_size={batch_size}, lr={lr}, head_lr={head_lr}, "
            f"warmup_epochs={warmup_epochs}, momentum={momentum}, recon_weight={recon_weight}, lite_rank={lite_rank}); need epochs, "
            "batch_size >= 1, lr and head_lr > 0, warmup_epochs >= 0, 0 <= momentum < 1, recon_weight >= 0, lite_rank >= 0"
        )
    if optimizer not in OPTIMIZERS:
        raise InvalidInput(f"unknown optimizer {optimizer!r}; pick one of {', '.join(OPTIMIZERS)}")
    files = scan_image_folder(data_dir, classes=list(classes) if classes is not None else None)
    backbone, preprocess = create_backbone(model_name, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size)
    fingerprint = backbone_fingerprint(backbone)
    generator = torch.Generator().manual_seed(seed)
    module = TopDownViT(
        backbone, value_path=value_path, decoder_init=decoder_init, train_selector=train_selector, drop_path=drop_path,
        generator=generator,
    )
    pretuned_meta = _start_from_pretuned(module, pretuned) if pretuned is not None else None
    if lite_rank:
        module.add_lora(lite_rank, alpha=lora_alpha, generator=generator)
    head = make_head(module.backbone.embed_dim, len(files.classes), generator)
    torch_device = torch.device(device)
    module.to(torch_device)
    head.to(torch_device)

    images = ImageCache(files.paths, preprocess)
    size = int(preprocess.input_size[-1])
    train_images = ImageCache(files.paths, train_preprocess(preprocess)) if augment else images
    labels = torch.from_numpy(files.labels)
    steps_per_epoch = math.ceil(len(files) / batch_size)
    total = min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch
    opt = make_optimizer(module, head, optimizer=optimizer, lr=lr, head_lr=head_lr, weight_decay=weight_decay, momentum=momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: warmup_cosine(epoch, warmup_epochs, epochs))

    initial_loss, _ = _evaluate(module, head, images, labels, batch_size, torch_device)
    step_losses: list[float] = []
    epoch_lrs: list[float] = []
    module.train()
    while len(step_losses) < total:
        epoch_lrs.append(float(opt.param_groups[0]["lr"]))
        order = torch.randperm(len(files), generator=generator)
        for start in range(0, len(order), batch_size):
            if len(step_losses) >= total:
                break
            index = order[start : start + batch_size]
            batch = _batch(train_images, index)
            if augment:
                batch = random_crop_flip(batch, size, flip=flip, generator=generator)
            target = labels[index].to(torch_device)
            feats, streams = module.forward_with_streams(batch.to(torch_device), keep_streams=recon_weight > 0, with_first=stage == "pretune")
            if stage == "pretune":  # AbSViT: the head's loss on both passes, averaged
                loss = (F.cross_entropy(head(feats[0]), target) + F.cross_entropy(head(feats[1]), target)) / 2
            else:
                loss = F.cross_entropy(head(feats), target)
            if recon_weight > 0:
                loss = loss + recon_weight * module.reconstruction_loss(streams)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(step_losses), total, step_losses[-1])
        schedule.step()  # once per epoch, as the released trainer
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
                "stage": stage,
                "pretuned_on": None if pretuned_meta is None else pretuned_meta.get("classes"),
                "backbone_source": source,
                "classes": list(files.classes),
                "epochs": epochs,
                "warmup_epochs": warmup_epochs,
                "steps": total,
                "optimizer": optimizer,
                "lr": lr,
                "head_lr": lr if head_lr is None else head_lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "batch_size": batch_size,
                "augment": augment,
                "flip": flip,
                "drop_path": drop_path,
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
        epoch_lrs=tuple(epoch_lrs),
        initial_loss=initial_loss,
        final_loss=final_loss,
        train_accuracy=accuracy,
        trainable_params=sum(p.numel() for p in module.toast_parameters()),
        checkpoint=path,
    )


_COMMON_DOC = """
        model_name: timm ViT name, e.g. vit_small_patch16_224.
        data_dir: ImageFolder tree, one sub-folder per class (at least two).
        classes: use only these class folders (e.g. a corpus's base split); None: all.
        checkpoint: local backbone weights (.pth/.safetensors); None uses timm's init or `pretrained`.
        pretrained: timm hub weights (needs network).
        img_size: input side (ViTs accept e.g. 32, 64, 224); None: the checkpoint's or the model's.
        epochs: passes over the folder (100, released).
        warmup_epochs: linear warm-up epochs before the cosine decay (10, released).
        lr: peak learning rate (0.01, the released config's default).
        head_lr: rate of the throw-away head; None: `lr` (released).
        optimizer: "sgd" (released, with `momentum` 0.9) or "adamw" (fsdeploy's earlier recipe).
        weight_decay: 1e-4 (released), on everything but the head's bias (adamw: matrices only).
        batch_size: images per step (32).
        augment: RandomCrop from the resized image (released); False: the eval transform only.
        flip: random horizontal flips with `augment` (released); pass False for glyphs/text, where a
            mirrored image is another class.
        drop_path: stochastic depth in the frozen blocks while training (0.1, released).
        value_path, decoder_init, train_selector, lora_alpha: `TopDownViT` options (released defaults).
        recon_weight: weight of the summed variational loss.
        max_steps: stop after this many steps (the schedule is laid out for `epochs`); None = all epochs.
        seed: seeds initialisation, shuffling, augmentation and drop path (a local generator; global RNG untouched).
        device: torch device, e.g. "cpu" or "cuda".
        out: write the checkpoint here (.safetensors); None keeps it in memory only.
        progress: called after every step with (step, total, loss).
"""


def pretune_toast(
    model_name: str,
    data_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    epochs: int = 100,
    warmup_epochs: int = 10,
    lr: float = 0.01,
    head_lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    augment: bool = True,
    flip: bool = True,
    drop_path: float = 0.1,
    value_path: str = "released",
    decoder_init: str = "trunc_normal",
    recon_weight: float = 0.1,
    max_steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Pre-tune the top-down path (decoders + task vector; selector frozen) on a generic labelled folder.

    The released stage before downstream tuning (on ImageNet-1k there; a base-class folder here). Loss: the
    mean cross-entropy of one head on both passes + `recon_weight` (0.1) x the variational loss summed over
    blocks (AbSViT's training step). The optimiser recipe is the downstream one (AbSViT trains the whole
    network from scratch with AdamW, which does not apply to a frozen backbone). Write the checkpoint with
    `out` and pass it to `tune_toast(pretuned=...)`.

    Args:""" + _COMMON_DOC + """
    Raises:
        InvalidInput: bad folder, non-ViT model, bad options.
    """
    return _tune(
        "pretune", model_name, data_dir, classes=classes, checkpoint=checkpoint, pretrained=pretrained, pretuned=None,
        img_size=img_size, epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, head_lr=head_lr, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, augment=augment, flip=flip,
        drop_path=drop_path, lite_rank=0, lora_alpha=1.0, value_path=value_path, decoder_init=decoder_init,
        train_selector=False, recon_weight=recon_weight, max_steps=max_steps, seed=seed, device=device, out=out,
        progress=progress,
    )


def tune_toast(
    model_name: str,
    data_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    pretuned: str | Path | None = None,
    img_size: int | None = None,
    epochs: int = 100,
    warmup_epochs: int = 10,
    lr: float = 0.01,
    head_lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    augment: bool = True,
    flip: bool = True,
    drop_path: float = 0.1,
    lite_rank: int = 0,
    lora_alpha: float = 1.0,
    value_path: str = "released",
    decoder_init: str = "trunc_normal",
    train_selector: bool | None = None,
    recon_weight: float = 0.0,
    max_steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune a TOAST top-down path for a frozen timm ViT on `data_dir/<class>/<image>` (the downstream stage).

    Args:
        pretuned: a `pretune_toast` checkpoint to start from (released: always pre-tuned first); None starts
            from the fresh init (`decoder_init`).
        lite_rank: 0 for full TOAST, r > 0 for TOAST-Lite (rank-r LoRA on the decoders, released r=4).
        recon_weight: the released ViT path tunes downstream without the variational loss (0).""" + _COMMON_DOC + """
    Raises:
        InvalidInput: bad folder, non-ViT model, bad options, a pre-tuned checkpoint of other weights.
    """
    return _tune(
        "tune", model_name, data_dir, classes=classes, checkpoint=checkpoint, pretrained=pretrained, pretuned=pretuned,
        img_size=img_size, epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, head_lr=head_lr, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, augment=augment, flip=flip,
        drop_path=drop_path, lite_rank=lite_rank, lora_alpha=lora_alpha, value_path=value_path, decoder_init=decoder_init,
        train_selector=train_selector, recon_weight=recon_weight, max_steps=max_steps, seed=seed, device=device, out=out,
        progress=progress,
    )
