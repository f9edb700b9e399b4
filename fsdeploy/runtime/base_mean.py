"""Reading the base-class mean feature a bundle carries for SimpleShot's centring (`--transform cl2n`).

SimpleShot (Wang et al., arXiv:1911.04623) subtracts the mean feature of the *base* (training) classes;
`fsdeploy.pipeline.base_mean` computes it at export (`--base-data`) and stores `base_mean.npy` in the bundle.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fsdeploy.bundle import Bundle
from fsdeploy.errors import BundleError

BASE_MEAN_FILE = "base_mean.npy"
STATIC_ADAPTERS = ("none", "toast")  # features that do not depend on a support set


def base_mean_fix(bundle: Bundle) -> str:
    """The one-line fix for a bundle without a base mean."""
    return (
        f"re-export with `fsdeploy export {bundle.manifest.model} ... --base-data DIR` (DIR: images of the classes the "
        f"backbone was trained on, one sub-folder per class), or use --transform cl2n-support to centre on the support set"
    )


def load_base_mean(bundle: Bundle) -> NDArray[np.float32]:
    """The stored base-class mean feature `(D,)`.

    Raises:
        BundleError: the bundle has none (the message says how to add one), or it does not fit the features.
    """
    record = bundle.manifest.extra.get("base_mean")
    if not record or record.get("file") not in bundle.manifest.files:
        raise BundleError(f"bundle {bundle.path} has no base-class mean feature, which SimpleShot (cl2n) centres on; {base_mean_fix(bundle)}")
    mean = np.load(bundle.path / record["file"], allow_pickle=False).astype(np.float32)
    if mean.shape != (bundle.manifest.feature_dim,):
        raise BundleError(f"{bundle.path / record['file']} holds shape {mean.shape}, not ({bundle.manifest.feature_dim},); re-export the bundle")
    return mean


def transform_options(bundle: Bundle, transform: str) -> dict[str, Any]:
    """Options a transform takes from the bundle: `cl2n` gets the base mean, the others nothing."""
    return {"mean": load_base_mean(bundle)} if transform == "cl2n" else {}
