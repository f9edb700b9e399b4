"""The base-class mean feature a bundle carries for SimpleShot's centring (`--transform cl2n`).

SimpleShot (Wang, Chao, Weinberger, van der Maaten, arXiv:1911.04623, 2019; mileyan/simple_shot
`src/train.py`, `extract_feature` / `metric_class_type`): CL2N subtracts the mean feature of the *base*
(training) classes, computed once with the trained network, from every support and query feature before
L2 normalisation; it is not a per-task statistic. This module computes that mean with the bundle's own
exported graph (so it is exactly the feature the deployed engine produces) over a folder of base-class
images, and stores it in the bundle as `base_mean.npy`, listed with its sha256 in `manifest.files` and
described in `manifest.extra["base_mean"]`. The bundle id hashes graph files only, so it does not change.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fsdeploy.atomic import atomic_path
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.bundle import Bundle, add_files
from fsdeploy.data import folders
from fsdeploy.runtime.base_mean import BASE_MEAN_FILE, STATIC_ADAPTERS, base_mean_fix, load_base_mean, transform_options  # noqa: F401

def split_classes(folder: str | Path, split: str) -> list[str] | None:
    """`--base-split`: the base split by default (every class without a splits.json); another name must exist."""
    return folders.split_classes(folder, split, required=split != "base", option="--base-split")


def compute_base_mean(
    bundle: Bundle,
    paths: Sequence[str | Path],
    *,
    batch: int = 64,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> NDArray[np.float64]:
    """Mean feature `(D,)` of the images `paths`, through the bundle's ONNX graph on ONNX Runtime (float64 sum).

    Raises:
        InvalidInput: no images, or an adapter whose features depend on the support set (CaSE).
    """
    from fsdeploy.data.images import load_checked
    from fsdeploy.engines import EngineOptions
    from fsdeploy.runtime import feature_path

    m = bundle.manifest
    if m.adapter not in STATIC_ADAPTERS:
        raise InvalidInput(
            f"--base-data needs features that do not depend on a support set (adapter {' or '.join(STATIC_ADAPTERS)}); "
            f"{bundle.path} has adapter {m.adapter}: export the plain backbone for SimpleShot"
        )
    if not paths:
        raise InvalidInput("--base-data holds no images; give a folder with one sub-folder of images per base class")
    path = feature_path(bundle, "ort", EngineOptions(threads=threads))
    total = np.zeros(m.feature_dim, dtype=np.float64)
    workers = threads or os.cpu_count() or 1
    try:
        for i in range(0, len(paths), batch):
            images = load_checked(list(paths[i : i + batch]), m.preprocess, workers=workers)
            feats, _ = path.support([images])
            if not np.isfinite(feats).all():
                bad = [str(paths[i + r]) for r in np.flatnonzero(~np.isfinite(feats).all(axis=1))[:3]]
                raise InvalidInput(f"base images {', '.join(bad)} gave NaN or inf features; remove them from --base-data")
            total += feats.astype(np.float64).sum(axis=0)
            if progress is not None:
                progress(min(i + batch, len(paths)), len(paths))
    finally:
        path.close()
    return total / len(paths)


def add_base_mean(
    bundle: Bundle,
    data: str | Path,
    *,
    classes: Sequence[str] | None = None,
    batch: int = 64,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Bundle:
    """Compute the mean feature of the ImageFolder `data` (or its `classes`) and store it in `bundle`.

    Writes `base_mean.npy` atomically, then the manifest (files + `extra["base_mean"]`) atomically.

    Raises:
        InvalidInput: a bad folder, no images, or a CaSE bundle.
    """
    from fsdeploy.data.folders import scan_image_folder

    files = scan_image_folder(data, classes=list(classes) if classes is not None else None)
    mean = compute_base_mean(bundle, files.paths, batch=batch, threads=threads, progress=progress)
    with atomic_path(bundle.path / BASE_MEAN_FILE, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, mean.astype(np.float32))
    record = {"file": BASE_MEAN_FILE, "images": len(files), "classes": len(files.classes), "source": str(data)}
    extra = {**bundle.manifest.extra, "base_mean": record}
    out = add_files(bundle, [BASE_MEAN_FILE], extra=extra)
    if out.manifest.bundle_id != bundle.manifest.bundle_id:  # graph files only: a base mean never changes the id
        raise BundleError("adding the base mean changed the bundle id; this is a bug, please report it")
    return out
