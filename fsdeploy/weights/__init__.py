"""Weights that ship with fsdeploy: backbones pretrained on the glyph corpus's base classes.

Nothing can be downloaded at run time, so the demo and the benchmarks default to these checkpoints; how each
was made (command, corpus hash, time, accuracy) is in MODEL_CARD.md beside them.

- `efficientnet_b0` (32 px): the demo default, plus its meta-trained CaSE blocks (UpperCaSE).
- `resnet18` (32 px): the ResNet that TSA's residual adapters need.
- `vit_tiny_patch16_224` (64 px): the ViT that TOAST and eTT need.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsdeploy.errors import InvalidInput


@dataclass(frozen=True)
class Shipped:
    """One shipped backbone checkpoint: its file, the side it was trained at and how to rebuild it."""

    model: str
    file: str
    img_size: int  # px; the checkpoint's metadata carries the full preprocessing
    reproduce: str
    case_file: str | None = None  # meta-trained CaSE blocks for this backbone, if shipped

    def path(self) -> Path:
        return Path(__file__).with_name(self.file)


_DATA = "fsdeploy data glyphs --out data/glyphs && "
SHIPPED: dict[str, Shipped] = {s.model: s for s in (
    Shipped("efficientnet_b0", "efficientnet_b0_glyphs.safetensors", 32,
            _DATA + "fsdeploy pretrain efficientnet_b0 --data data/glyphs --out fsdeploy/weights/"
            "efficientnet_b0_glyphs.safetensors --img-size 32 --epochs 25 --batch 128 --lr 0.002 --threads 1 "
            "--no-recalibrate-bn",
            case_file="efficientnet_b0_glyphs_case.safetensors"),
    Shipped("resnet18", "resnet18_glyphs.safetensors", 32,
            _DATA + "fsdeploy pretrain resnet18 --data data/glyphs --out fsdeploy/weights/resnet18_glyphs.safetensors "
            "--img-size 32 --epochs 20 --batch 128 --lr 0.002 --threads 1"),
    Shipped("vit_tiny_patch16_224", "vit_tiny_patch16_224_glyphs.safetensors", 64,
            # two stages: a ViT from scratch stays at chance on all 1,334 classes for epochs, so it first learns
            # 120 of them from a smaller corpus render (base classes only), then all of them
            _DATA + "fsdeploy data glyphs --out runs/glyphs300 --classes 300 && fsdeploy pretrain "
            "vit_tiny_patch16_224 --data runs/glyphs300 --out vit300.safetensors --img-size 64 --epochs 40 --batch 64 "
            "--lr 0.0005 --warmup-epochs 3 --threads 1 && fsdeploy pretrain vit_tiny_patch16_224 --data data/glyphs "
            "--init vit300.safetensors --out fsdeploy/weights/vit_tiny_patch16_224_glyphs.safetensors --img-size 64 "
            "--epochs 15 --batch 128 --lr 0.0005 --warmup-epochs 1 --precision bf16 --threads 1"),
)}

DEFAULT_MODEL = "efficientnet_b0"
DEFAULT_IMG_SIZE = SHIPPED[DEFAULT_MODEL].img_size


def shipped(model: str) -> Shipped | None:
    """The shipped checkpoint record for timm `model`, or None when fsdeploy ships none for it."""
    return SHIPPED.get(model)


def shipped_checkpoint(model: str) -> Path:
    """Path of the shipped glyph checkpoint for `model`.

    Raises:
        InvalidInput: fsdeploy ships none for `model`, or the file is missing from this install.
    """
    record = SHIPPED.get(model)
    if record is None:
        raise InvalidInput(f"fsdeploy ships no checkpoint for {model!r} (it has {', '.join(SHIPPED)}); pass "
                           "--checkpoint FILE or train one with `fsdeploy pretrain`")
    path = record.path()
    if not path.is_file():
        raise InvalidInput(f"shipped checkpoint {path} is missing; reinstall fsdeploy or rebuild it: {record.reproduce}")
    return path


def default_checkpoint() -> Path:
    """Path of the shipped `efficientnet_b0` glyph checkpoint (the demo default).

    Raises:
        InvalidInput: the file is missing from this install (see MODEL_CARD.md to rebuild it).
    """
    return shipped_checkpoint(DEFAULT_MODEL)


def model_card() -> Path:
    """Path of MODEL_CARD.md, which records how the shipped checkpoints were trained."""
    return Path(__file__).with_name("MODEL_CARD.md")
