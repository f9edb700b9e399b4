"""One image cache: decode and preprocess each file at most once while the cache fits its memory budget.

Episode loops (benchmarks, meta-training) and training epochs revisit the same images; decoding dominates
their time on a small CPU. Images past the budget are decoded again each time they are asked for.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fsdeploy.backbones import Preprocess
from fsdeploy.data.images import load_checked

DEFAULT_MAX_BYTES = 1 << 30


class ImageCache:
    """Preprocessed images of `paths` by index.

    Args:
        paths: the dataset's files (index i is `paths[i]`).
        preprocess: the bundle's or model's preprocessing.
        max_bytes: most bytes of preprocessed images kept (1 GiB: 5,300 images at 224 px).
        workers: decoding threads for a batch of misses.
    """

    def __init__(self, paths: Sequence[str | Path], preprocess: Preprocess, *, max_bytes: int = DEFAULT_MAX_BYTES, workers: int = 1) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.max_bytes = max_bytes
        self.workers = workers
        self.cache: dict[int, NDArray[np.float32]] = {}
        self.bytes = 0

    def get(self, index: Sequence[int] | np.ndarray) -> NDArray[np.float32]:
        """Images `(len(index), 3, H, W)` in the order of `index`."""
        rows = [int(i) for i in np.asarray(index).ravel()]
        missing = list(dict.fromkeys(r for r in rows if r not in self.cache))
        fresh: dict[int, NDArray[np.float32]] = {}
        if missing:
            arrays = load_checked([self.paths[r] for r in missing], self.preprocess, workers=self.workers)
            for r, a in zip(missing, arrays):
                if self.bytes + a.nbytes <= self.max_bytes:
                    self.cache[r] = a
                    self.bytes += a.nbytes
                else:
                    fresh[r] = a
        if not rows:
            return np.zeros((0, *self.preprocess.input_size), dtype=np.float32)
        return np.stack([self.cache[r] if r in self.cache else fresh[r] for r in rows])
