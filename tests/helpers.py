"""Test utilities: tiny image folders and backbones with realistic activation scales.

timm's random init zero-initialises the last BatchNorm of each block, so features come out ~1e-5 and
any max-abs tolerance would pass trivially. `realistic_` gives every norm layer O(1) statistics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fsdeploy.bench.workspace import unit_scale_norms_


def realistic_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise norm affine and running stats in place so activations are O(1) (the library's helper)."""
    return unit_scale_norms_(model, seed)


def make_checkpoint(name: str, path: Path, img_size: int = 32, seed: int = 0) -> Path:
    """Save a realistic random-init checkpoint of timm `name` through fsdeploy's writer."""
    from fsdeploy.backbones import create_backbone, save_checkpoint

    model, pre = create_backbone(name, img_size=img_size)
    return save_checkpoint(realistic_(model, seed), path, name=name, preprocess=pre)


def tiny_bundle(root: Path, name: str = "resnet18", img_size: int = 32, *, validate: bool = False):
    """Export a realistic random-init `name` to `root/bundle` (checkpoint at `root/w.safetensors`); the bundle."""
    from fsdeploy.pipeline.export import export_bundle

    ckpt = make_checkpoint(name, root / "w.safetensors", img_size=img_size)
    bundle, _ = export_bundle(name, root / "bundle", checkpoint=ckpt, img_size=img_size, validate=validate)
    return bundle


def glyph_folder(root: Path, classes: str = "ABCD", per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """An ImageFolder of letters drawn with DejaVu/PIL default fonts at jittered positions (real renders)."""
    rng = np.random.default_rng(seed)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", int(size * 0.7))
    except OSError:
        font = ImageFont.load_default()
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("L", (size, size), 255)
            dx, dy = rng.integers(-4, 5, size=2)
            ImageDraw.Draw(img).text((size * 0.2 + dx, size * 0.05 + dy), c, fill=0, font=font)
            img.rotate(float(rng.uniform(-10, 10)), fillcolor=255).save(d / f"{i}.png")
    return root
