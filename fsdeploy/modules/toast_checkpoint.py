"""TOAST checkpoints: what `fsdeploy toast-tune` writes and `fsdeploy export --adapter toast` reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsdeploy.backbones import Preprocess, create_backbone, read_checkpoint, save_checkpoint
from fsdeploy.errors import InvalidInput
from fsdeploy.modules.toast import TopDownViT

CHECKPOINT_FORMAT = 2  # bump when the key layout or meaning of a TOAST checkpoint changes
# Format 1 (before issue #19): value maps added straight to v without bias, LoRA updates unscaled. Those
# checkpoints still load, as that network: value_path="learned", LoRA alpha = rank (scale 1).
READABLE_FORMATS = (1, 2)


def backbone_fingerprint(backbone: nn.Module) -> str:
    """sha256 of the backbone's weights, so a TOAST checkpoint is never loaded onto other weights."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(backbone.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_toast(
    module: TopDownViT,
    path: str | Path,
    *,
    model_name: str,
    preprocess: Preprocess,
    backbone_sha256: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the top-down tensors to `.safetensors`, with metadata an exporter needs.

    Metadata (JSON under key "fsdeploy"): model, preprocessing, adapter="toast", format, lite_rank,
    lora_alpha, value_path, img_size, backbone_sha256 (of the frozen weights it was tuned on), plus `extra`.
    """
    meta = {
        "adapter": "toast",
        "toast_format": CHECKPOINT_FORMAT,
        "lite_rank": module.lite_rank,
        "lora_alpha": module.lora_alpha,
        "value_path": module.value_path,
        "img_size": int(preprocess.input_size[-1]),
        "backbone_sha256": backbone_sha256 or backbone_fingerprint(module.backbone),
        **(extra or {}),
    }
    return save_checkpoint(module.toast_state_dict(), path, name=model_name, preprocess=preprocess, extra=meta)


def toast_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a TOAST checkpoint (model, preprocessing fields, lite_rank, img_size, ...).

    Raises:
        InvalidInput: unreadable file, or not a TOAST checkpoint.
    """
    return _read_toast(path)[1]


def _read_toast(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state, meta = read_checkpoint(path)
    if meta.get("adapter") != "toast":
        raise InvalidInput(
            f"{path} is not a TOAST checkpoint (adapter={meta.get('adapter')!r}); pass the file written by `fsdeploy toast-tune`"
        )
    if int(meta.get("toast_format", -1)) not in READABLE_FORMATS:
        raise InvalidInput(
            f"{path} has TOAST checkpoint format {meta.get('toast_format')}, this fsdeploy reads "
            f"{', '.join(map(str, READABLE_FORMATS))}; re-run toast-tune"
        )
    return state, meta


def module_options(meta: dict[str, Any]) -> dict[str, Any]:
    """TopDownViT keyword arguments that rebuild the network a checkpoint was tuned as (format 1 included)."""
    rank = int(meta.get("lite_rank", 0))
    if int(meta["toast_format"]) == 1:  # pre-#19: bias-free learned value maps, unscaled LoRA
        return {"lite_rank": rank, "lora_alpha": float(max(rank, 1)), "value_path": "learned", "decoder_init": "identity"}
    return {
        "lite_rank": rank,
        "lora_alpha": float(meta.get("lora_alpha", 1.0)),
        "value_path": str(meta.get("value_path", "released")),
        "decoder_init": "identity",  # overwritten by the checkpoint's tensors; draws nothing for the decoders
    }


def read_top_down(path: str | Path, backbone: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A TOAST checkpoint's tensors and metadata, after checking it was tuned on exactly `backbone`'s weights.

    Raises:
        InvalidInput: not a TOAST checkpoint, or tuned on other backbone weights.
    """
    state, meta = _read_toast(path)
    found = backbone_fingerprint(backbone)
    if found != meta.get("backbone_sha256"):
        raise InvalidInput(
            f"TOAST checkpoint {path} was tuned on other backbone weights (sha256 {str(meta.get('backbone_sha256'))[:12]}, "
            f"these are {found[:12]}, from {meta.get('backbone_source', 'unknown')}); pass the backbone checkpoint and "
            "img_size used for tuning"
        )
    return state, meta


def load_top_down_state(module: TopDownViT, state: dict[str, torch.Tensor], path: str | Path) -> TopDownViT:
    """Load top-down tensors into `module` (same layout), or raise a one-line InvalidInput naming the fix."""
    expected = set(module.toast_state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InvalidInput(
            f"TOAST checkpoint {path} does not fit this network: missing {missing[:3]}, unexpected {unexpected[:3]}; re-run toast-tune"
        )
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InvalidInput(f"TOAST checkpoint {path} does not fit this network: {str(exc).splitlines()[-1].strip()}; re-run toast-tune") from None
    return module


def load_toast(
    model_name: str | None,
    toast_ckpt: str | Path,
    backbone_checkpoint: str | Path | None = None,
    img_size: int | None = None,
    *,
    pretrained: bool = False,
) -> TopDownViT:
    """Rebuild the complete two-pass network from a TOAST checkpoint, LoRA merged, eval mode.

    The result's `forward(images (B, 3, H, W)) -> features (B, D)` is ready for `torch.onnx.export`.

    Args:
        model_name: timm name; None takes the one recorded in the checkpoint.
        toast_ckpt: file written by `tune_toast` / `save_toast`.
        backbone_checkpoint: the frozen weights used when tuning (None: timm init or `pretrained`).
        img_size: input side; defaults to the size it was tuned at.
        pretrained: take the backbone from timm's pretrained weights (needs network).

    Raises:
        InvalidInput: not a TOAST checkpoint, another model, or backbone weights other than the tuned-on ones.
    """
    state, meta = _read_toast(toast_ckpt)
    name = model_name or meta["model"]
    if name != meta["model"]:
        raise InvalidInput(f"TOAST checkpoint {toast_ckpt} was tuned on {meta['model']}, not {name}; pass {meta['model']}")
    backbone, _ = create_backbone(
        name, checkpoint=backbone_checkpoint, pretrained=pretrained, img_size=img_size or int(meta["img_size"])
    )
    read_top_down(toast_ckpt, backbone)
    module = TopDownViT(backbone, **module_options(meta))
    return load_top_down_state(module, state, toast_ckpt).merge_lora().eval()
