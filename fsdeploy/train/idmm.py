"""IDMM pretraining: parametric instance discrimination on a small unlabelled image set (ViTs and any timm model).

"Training Vision Transformers with Only 2040 Images" (Cao, Yu, Wu; ECCV 2022). Every training image is its own
class: a linear classifier as wide as the image count, trained with cross-entropy on augmented views. Multi-crop
gives several views per image per step, CutMix mixes pairs of views inside each crop group, and label smoothing
softens the targets; the paper argues the last two keep the rarely-visited instance weights of the wide
classifier updating (a one-hot target only moves one row per sample). Low resolution keeps it cheap.

Recipe as the official code (CupidJay/Training-Vision-Transformers-with-only-2040-images,
main_deit_instance_discrimination.py): crops 2 × (scale 0.14–1) + 4 × (scale 0.05–0.4), both groups at the
training size, each crop flipped, colour-jittered (0.8·s brightness/contrast/saturation, 0.2·s hue, p 0.8),
grayscaled (p 0.2) and blurred (p 0.5, σ 0.1–2); each group gets its own CutMix (λ ~ Beta(α, α) with α 0.5,
λ ← max(λ, 1 − λ), box of area 1 − λ at a uniform centre, clipped, λ re-set to the kept pixel share), and the
two groups' losses are summed. AdamW (lr 5e-4, weight decay 1e-3), 2 warm-up epochs then cosine, drop-path 0.1.
Label smoothing (0.1 here) follows the paper's text; the released script has it commented out.
"""
from __future__ import annotations

import hashlib
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fsdeploy.backbones import SIZED_AT_BUILD, Preprocess, family_of, save_checkpoint
from fsdeploy.errors import InvalidInput

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropGroup:
    """`count` random resized crops covering `scale` of the image's area."""

    count: int
    scale: tuple[float, float]


OFFICIAL_CROPS = (CropGroup(2, (0.14, 1.0)), CropGroup(4, (0.05, 0.4)))


@dataclass(frozen=True)
class IdmmConfig:
    """An IDMM run's settings (recorded in the checkpoint)."""

    model: str
    data: Path
    out: Path
    img_size: int = 32
    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-3
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    cutmix_alpha: float = 0.5
    crops: tuple[CropGroup, ...] = OFFICIAL_CROPS
    color_strength: float = 1.0
    drop_path: float = 0.1
    max_steps: int | None = None
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    fp16: bool = True

    def as_command(self) -> str:
        crops = ",".join(str(c.count) for c in self.crops)
        parts = ["fsdeploy", "pretrain", self.model, "--recipe", "idmm", "--data", str(self.data), "--out", str(self.out),
                 "--img-size", str(self.img_size), "--epochs", str(self.epochs), "--batch", str(self.batch_size),
                 "--lr", f"{self.lr:g}", "--weight-decay", f"{self.weight_decay:g}", "--label-smoothing",
                 f"{self.label_smoothing:g}", "--cutmix-alpha", f"{self.cutmix_alpha:g}", "--crops", crops,
                 "--seed", str(self.seed)]
        parts += [] if self.max_steps is None else ["--max-steps", str(self.max_steps)]
        return shlex.join(parts)


@dataclass(frozen=True)
class IdmmEpoch:
    epoch: int
    loss: float
    accuracy: float  # instance accuracy of the un-mixed label on the first crop group
    lr: float
    seconds: float


@dataclass(frozen=True)
class IdmmResult:
    checkpoint: Path
    history: tuple[IdmmEpoch, ...]
    images: int
    steps: int
    data_sha256: str
    seconds: float


def smoothed_targets(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot rows: (1 − ε)·onehot + ε / K (torch's CrossEntropyLoss(label_smoothing=ε) target)."""
    return F.one_hot(labels, classes).float() * (1.0 - smoothing) + smoothing / classes


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The official rand_bbox: a box of side √(1 − λ)·size at a uniform centre, clipped; (y1, y2, x1, x2)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y1, y2, x1, x2


def cutmix(
    x: torch.Tensor, labels: torch.Tensor, classes: int, *, alpha: float, smoothing: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix a batch with a random permutation of itself; returns (mixed images, soft targets (B, K), λ).

    Targets are λ·smooth(y) + (1 − λ)·smooth(y[perm]) with λ the share of pixels kept, so cross-entropy against
    them equals the official λ·CE(y) + (1 − λ)·CE(y[perm]) of a label-smoothed criterion.
    """
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    lam = max(lam, 1.0 - lam)
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    h, w = x.shape[-2:]
    y1, y2, x1, x2 = cutmix_box(h, w, lam, rng)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    soft = lam * smoothed_targets(labels, classes, smoothing) + (1.0 - lam) * smoothed_targets(labels[perm], classes, smoothing)
    return mixed, soft, lam


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −Σ_k t_k log softmax(z)_k."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def load_unlabelled(data: Path, size: int) -> tuple[torch.Tensor, str, list[Path]]:
    """Every image under `data` (any depth, labels ignored) as uint8 RGB (N, 3, size, size), with a content hash."""
    from PIL import Image

    from fsdeploy.data.folders import list_images

    if not Path(data).is_dir():
        raise InvalidInput(f"--data {data} is not a folder; pass a folder of images (sub-folders are fine, labels are ignored)")
    paths = sorted(list_images([data]))
    if len(paths) < 2:
        raise InvalidInput(f"--data {data} holds {len(paths)} image; instance discrimination needs at least 2")
    digest = hashlib.sha256()
    pixels = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        raw = p.read_bytes()
        digest.update(hashlib.sha256(raw).digest())
        with Image.open(p) as img:
            pixels[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    return torch.from_numpy(pixels), digest.hexdigest(), paths


def _view_transform(size: int, scale: tuple[float, float], strength: float) -> Any:
    from torchvision.transforms import v2

    s = strength
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=max(3, (size // 10) | 1), sigma=(0.1, 2.0))], p=0.5),
    ])


def make_views(images: torch.Tensor, group: CropGroup, transform: Any) -> torch.Tensor:
    """`group.count` augmented views of each uint8 image, stacked view-major: (count·B, 3, S, S) float in [0, 1]."""
    views = [torch.stack([transform(img) for img in images]) for _ in range(group.count)]
    return torch.cat(views).float() / 255.0


def idmm_pretrain(cfg: IdmmConfig, *, on_step: Callable[[int, int, float], None] | None = None,
                  on_epoch: Callable[[IdmmEpoch], None] | None = None) -> IdmmResult:
    """Pretrain `cfg.model` by instance discrimination on the images under `cfg.data`; write the headless backbone.

    Raises:
        InvalidInput: unusable folder, output path or option.
    """
    if cfg.out.suffix != ".safetensors":
        raise InvalidInput(f"--out {cfg.out} must end in .safetensors")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.img_size < 16 or not cfg.crops:
        raise InvalidInput(f"need epochs >= 1, batch size >= 2, img size >= 16 and crops; got {cfg.epochs}, {cfg.batch_size}, {cfg.img_size}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise InvalidInput(f"--label-smoothing {cfg.label_smoothing} must be in [0, 1)")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # torchvision's transforms draw from torch's global generator
            return _train(cfg, on_step, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: IdmmConfig, on_step: Any, on_epoch: Any) -> IdmmResult:
    import timm

    start = time.perf_counter()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, digest, _ = load_unlabelled(cfg.data, cfg.img_size)
    n = len(images)
    if not timm.models.is_model(cfg.model):
        raise InvalidInput(f"unknown timm model {cfg.model!r}; try vit_tiny_patch16_224 or resnet18")
    kwargs: dict[str, Any] = {"num_classes": n, "drop_path_rate": cfg.drop_path}
    if family_of(cfg.model) in SIZED_AT_BUILD:
        kwargs["img_size"] = cfg.img_size
    model = timm.create_model(cfg.model, **kwargs).to(device).train()  # classifier width = number of images
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, n)
    per_epoch = max(1, n // batch)
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    warmup = max(1, round(cfg.warmup_epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    transforms = [_view_transform(cfg.img_size, g.scale, cfg.color_strength) for g in cfg.crops]
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    rng = np.random.default_rng(cfg.seed)
    history: list[IdmmEpoch] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = torch.from_numpy(rng.permutation(n))
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(per_epoch):
            if step >= total:
                break
            idx = order[b * batch : (b + 1) * batch]
            loss = torch.zeros((), device=device)
            for g, (group, tf) in enumerate(zip(cfg.crops, transforms)):
                views = make_views(images[idx], group, tf).to(device)
                labels = idx.repeat(group.count).to(device)  # view-major, as the views
                mixed, soft, _ = cutmix(views, labels, n, alpha=cfg.cutmix_alpha, smoothing=cfg.label_smoothing, rng=rng)
                logits = model((mixed - mean) / std)
                loss = loss + soft_cross_entropy(logits, soft)
                if g == 0:
                    correct += int((logits.argmax(1) == labels).sum())
                    seen += len(labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            step += 1
            if on_step is not None:
                on_step(step, total, loss.item())
        steps_done = max(1, min(per_epoch, step - (epoch - 1) * per_epoch))
        stats = IdmmEpoch(epoch, loss_sum / steps_done, correct / max(1, seen), sched.get_last_lr()[0], time.perf_counter() - t0)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if step >= total:
            break
    model.reset_classifier(0)
    preprocess = Preprocess(input_size=(3, cfg.img_size, cfg.img_size), mean=MEAN, std=STD, crop_pct=1.0, interpolation="bilinear")
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "crops"}
    record["crops"] = [[c.count, list(c.scale)] for c in cfg.crops]
    extra = {"train_command": cfg.as_command(), "idmm": record, "data_sha256": digest, "instances": n}
    save_checkpoint(model.cpu(), cfg.out, name=cfg.model, preprocess=preprocess, fp16=cfg.fp16, extra=extra)
    return IdmmResult(cfg.out, tuple(history), n, step, digest, time.perf_counter() - start)


def parse_crops(text: str, scales: Sequence[tuple[float, float]] = tuple(c.scale for c in OFFICIAL_CROPS)) -> tuple[CropGroup, ...]:
    """`2,4` -> the official two groups with those counts (global scale 0.14–1, local 0.05–0.4); `2` -> global only."""
    scales = list(scales)
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise InvalidInput(f"--crops {text!r} is not a list of counts; write e.g. 2,4 (2 global + 4 local crops)") from None
    if not 1 <= len(counts) <= len(scales) or min(counts) < 1:
        raise InvalidInput(f"--crops {text!r}: give 1 or 2 positive counts, global then local, e.g. 2,4")
    return tuple(CropGroup(c, s) for c, s in zip(counts, scales))
