"""Real photographs that ship inside an installed package (matplotlib's sample data), for export validation.

Random tensors exercise every value range; real images exercise the activation statistics a deployed
model sees. Several crops of each photo give distinct images without any download.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from fsdeploy.backbones import Preprocess
from fsdeploy.data.images import load_image, preprocess_image

_FILES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def sample_photo_paths() -> list[Path]:
    """Paths of the bundled photos that exist in this matplotlib install."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "sample_data"
    return [root / f for f in _FILES if (root / f).is_file()]


def real_batch(cfg: Preprocess, n: int, rng: np.random.Generator) -> NDArray[np.float32]:
    """`n` preprocessed random crops (30-100% side) of the bundled photos, `(n, 3, H, W)`."""
    photos: list[Image.Image] = [load_image(p) for p in sample_photo_paths()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.3, 1.0))
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        out.append(preprocess_image(img.crop((x0, y0, x0 + side, y0 + side)), cfg))
    return np.stack(out)
