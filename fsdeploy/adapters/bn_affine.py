"""The `bn-affine` adapter kind: only the BatchNorm affine parameters train per task (TSA's loss and optimiser).

The new γ/β replace the plain BatchNorm weights in the folded graph; the stored head is a cosine NCC (scale 10).
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter


def fit(backbone: Any, images: Any, labels: Any, *, steps: int, optimizer: str = "adadelta", device: str | None = None) -> Any:
    """BN-affine's fit with Adadelta (TSA's optimiser) or OLOR (`fsdeploy.train.olor`)."""
    from fsdeploy.train.tsa import fit_bn_affine

    return fit_bn_affine(backbone, images, labels, steps=steps, optimizer=optimizer, device=device)


def head(result: Any) -> Any:
    from fsdeploy.heads.pipeline import TaskModel

    return TaskModel.create("ncc", "none", distance="cosine", scale=10.0)


def fit_macs(backbone: Any, size: int, n_support: int, steps: int, **_: Any) -> int:  # fit options do not change it
    from fsdeploy.train.tsa import bn_affine_adapt_macs

    return bn_affine_adapt_macs(backbone, size, n_support, steps=steps)


KIND = register_adapter(AdapterKind(
    name="bn-affine",
    summary="BN-affine: BatchNorm scales and shifts fitted per task (40 steps), folded and re-exported",
    bundle_adapter="none",
    fit=fit,
    head=head,
    fit_macs=fit_macs,
    methods={"bn-affine": {}, "bn-affine-olor": {"optimizer": "olor"}},
    options={"optimizer": "adadelta (lr 0.5) or olor (OLOR: Adam lr 1e-3, rollback towards the pretrained BN weights)"},
    default_steps=40,
    steps_source="TSA's loop",
))
