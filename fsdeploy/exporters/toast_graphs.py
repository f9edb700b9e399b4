"""The graph of a TOAST bundle: the two-pass TOAST ViT as one `features` graph.

TOAST: Shi, Darrell, Wang, "TOAST: Transfer Learning via Attention Steering". The checkpoint is the one
`fsdeploy toast-tune` writes; the frozen backbone it was tuned on comes from `--backbone-checkpoint`.
"""
from __future__ import annotations

import torch

from fsdeploy.backbones import BuildRequest, Preprocess, create_backbone, read_checkpoint
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport, images_only
from fsdeploy.exporters.spec import ExportSpec
from fsdeploy.modules.toast import TopDownViT, toast_macs, vit_macs
from fsdeploy.modules.toast_checkpoint import load_toast, toast_metadata

# Attention re-runs with an extra value term: float rounding grows a little over two passes.
TOAST_SPEC = ExportSpec(atol=1e-4)


def build_toast(request: BuildRequest) -> AdaptedModel:
    """Two-pass TOAST network from a toast-tune checkpoint (LoRA merged); from a plain backbone checkpoint
    (or none), the untuned TOAST network at the released init (trunc-normal decoders, seed 0)."""
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
        module = TopDownViT(backbone, generator=torch.Generator().manual_seed(0))
        size = pre.input_size[-1]
    module.eval()
    extra = {"inference_macs": int(toast_macs(module, size)), "plain_vit_macs": int(vit_macs(module.backbone, size))}
    return AdaptedModel(module, pre, (GraphExport("features", module, TOAST_SPEC, images_only),), extra)
