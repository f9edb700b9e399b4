"""Weights that ship with fsdeploy: an efficientnet_b0 backbone pretrained on glyph base classes.

Nothing can be downloaded at run time, so the demo and the benchmarks default to this checkpoint; how it was
made (command, corpus seed and hash, accuracy) is in MODEL_CARD.md beside it.
"""
from __future__ import annotations

from pathlib import Path

from fsdeploy.errors import InvalidInput

DEFAULT_MODEL = "efficientnet_b0"
DEFAULT_IMG_SIZE = 32  # px; the checkpoint's metadata carries the full preprocessing
DEFAULT_CHECKPOINT_NAME = "efficientnet_b0_glyphs.safetensors"
REPRODUCE = (
    "fsdeploy data glyphs --out data/glyphs && fsdeploy pretrain efficientnet_b0 --data data/glyphs "
    f"--out fsdeploy/weights/{DEFAULT_CHECKPOINT_NAME} --img-size 32 --epochs 25 --batch 128 --lr 0.002 "
    "--threads 1 --no-recalibrate-bn"
)


def default_checkpoint() -> Path:
    """Path of the shipped `efficientnet_b0` glyph checkpoint.

    Raises:
        InvalidInput: the file is missing from this install (see MODEL_CARD.md to rebuild it).
    """
    path = Path(__file__).with_name(DEFAULT_CHECKPOINT_NAME)
    if not path.is_file():
        raise InvalidInput(f"shipped checkpoint {path} is missing; reinstall fsdeploy or rebuild it: {REPRODUCE}")
    return path


def model_card() -> Path:
    """Path of MODEL_CARD.md, which records how the shipped checkpoint was trained."""
    return Path(__file__).with_name("MODEL_CARD.md")
