"""The `toast` adapter kind: the two-pass TOAST ViT as one `features` graph (tuned per dataset, not per task).

TOAST: Shi, Darrell, Wang, "TOAST: Transfer Learning via Attention Steering". The checkpoint is the one
`fsdeploy toast-tune` writes; the frozen backbone it was tuned on comes from `--backbone-checkpoint`.
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter
from fsdeploy.backbones import BuildRequest, Preprocess, create_backbone, read_checkpoint
from fsdeploy.bench.costs import BACKWARD_TEXT, Cost, head_text, register_formula
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport, images_only
from fsdeploy.exporters.spec import ExportSpec
from fsdeploy.modules.toast import TopDownViT, toast_macs, vit_macs
from fsdeploy.modules.toast_checkpoint import load_toast, toast_metadata

# Attention re-runs with an extra value term: float rounding grows a little over two passes.
TOAST_SPEC = ExportSpec(atol=1e-4)


def build_toast(request: BuildRequest) -> AdaptedModel:
    """Two-pass TOAST network from a toast-tune checkpoint (LoRA merged); from a plain backbone checkpoint
    (or none), the untuned TOAST network whose zero-init feedback makes it equal the plain ViT."""
    if request.checkpoint is not None and read_checkpoint(request.checkpoint)[1].get("adapter") == "toast":
        module = load_toast(
            request.model, request.checkpoint, backbone_checkpoint=request.options.get("backbone_checkpoint"),
            img_size=request.img_size, pretrained=request.pretrained,
        )
        meta = toast_metadata(request.checkpoint)
        pre = Preprocess.from_dict({**module.backbone.pretrained_cfg, **meta})
        size = int(request.img_size or meta["img_size"])
        pre = Preprocess(input_size=(3, size, size), mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    else:
        backbone, pre = create_backbone(
            request.model, checkpoint=request.checkpoint, pretrained=request.pretrained, img_size=request.img_size
        )
        module = TopDownViT(backbone)
        size = pre.input_size[-1]
    module.eval()
    extra = {"inference_macs": int(toast_macs(module, size)), "plain_vit_macs": int(vit_macs(module.backbone, size))}
    return AdaptedModel(module, pre, (GraphExport("features", module, TOAST_SPEC, images_only),), extra)


def count_toast(model: Any, size: int) -> Any:
    """The plain ViT's counts plus the tuned two-pass network's inference MACs."""
    from dataclasses import replace

    import torch

    from fsdeploy.adapters.none import count_plain
    from fsdeploy.bench.macs import count_macs

    return replace(count_plain(model.backbone, size), toast=count_macs(model, torch.zeros(1, 3, size, size)).total)


@register_formula("toast")
def toast_cost(m: Any, c: Any, task: Any, head: Any, tf: Any) -> Cost:
    """TOAST + head: one forward of the tuned network over the support set + the head's fit (tuning is per dataset)."""
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
    build=build_toast,
    feature_path=toast_path,
    count=count_toast,
    families=("vision_transformer",),
    default_heads=("linear",),
    head_methods={"linear": "toast"},
    why_missing="needs a TOAST bundle (ViT): fsdeploy export MODEL --adapter toast",
))
