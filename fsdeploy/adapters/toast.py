"""The `toast` adapter kind: TOAST (Shi et al., "TOAST: Transfer Learning via Attention Steering").

Top-down attention steering of a frozen ViT, tuned once per dataset (`fsdeploy toast-tune`), exported as one
two-pass `features` graph (`fsdeploy.exporters.toast_graphs`); per task, a numpy head on its features.
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter


def build(request: Any) -> Any:
    from fsdeploy.exporters.toast_graphs import build_toast

    return build_toast(request)


def count_toast(model: Any, size: int) -> Any:
    """The plain ViT's counts plus the tuned two-pass network's inference MACs."""
    from dataclasses import replace

    import torch

    from fsdeploy.adapters.none import count_plain
    from fsdeploy.bench.macs import count_macs

    return replace(count_plain(model.backbone, size), toast=count_macs(model, torch.zeros(1, 3, size, size)).total)


def toast_cost(m: Any, c: Any, task: Any, head: Any, tf: Any) -> Any:
    """TOAST + head: one forward of the tuned network over the support set + the head's fit (tuning is per dataset)."""
    from fsdeploy.bench.costs import BACKWARD_TEXT, Cost, head_text

    n, k, d = task.n_support, task.ways, c.dim
    head_part = tf(n) + head.fit_macs(n, d, k)
    return Cost(n * c.toast + head_part, c.toast + tf(1) + head.predict_macs(1, d, k), head.n_params(d, k), head_part,
                f"1 forward of the support set + {head_text(m)} fit", BACKWARD_TEXT["toast"])


def toast_path(bundle: Any, backend: str, options: Any, **_: Any) -> Any:
    from fsdeploy.runtime.paths import PlainPath

    return PlainPath(bundle, backend, options)


KIND = register_adapter(AdapterKind(
    name="toast",
    summary="TOAST: top-down attention steering of a frozen ViT, tuned once per dataset (toast-tune)",
    build=build,
    feature_path=toast_path,
    count=count_toast,
    cost=toast_cost,
    families=("vision_transformer",),
    default_heads=("linear",),
    head_methods={"linear": "toast"},
    why_missing="needs a TOAST bundle (ViT): fsdeploy export MODEL --adapter toast",
))
