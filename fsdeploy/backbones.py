"""Create frozen timm backbones from a name, a local checkpoint, or timm's own pretrained path.

A backbone here is a timm model built with `num_classes=0`, so `model(images)` returns pooled
features `(B, D)`. Checkpoints written by fsdeploy carry their preprocessing in safetensors metadata
(key "fsdeploy"), so a bundle exported from them normalises images the way the weights were trained.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fsdeploy.atomic import atomic_path
from fsdeploy.deps import require
from fsdeploy.errors import FsdeployError, InvalidInput, UnknownName

META_KEY = "fsdeploy"


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform, as plain values: resize (shorter side), centre crop, normalise."""

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            crop_pct=float(d.get("crop_pct", 0.875)),
            interpolation=str(d.get("interpolation", "bicubic")),
        )


@dataclass(frozen=True)
class BuildRequest:
    """Where the weights come from and at what resolution."""

    model: str
    checkpoint: Path | None = None
    pretrained: bool = False
    img_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific structure (e.g. TOAST LoRA rank)


# timm families whose position embeddings are sized at construction: they take `img_size=` (CNNs do not)
SIZED_AT_BUILD = frozenset({"vision_transformer", "deit", "vision_transformer_hybrid", "eva", "beit"})


def family_of(name: str) -> str:
    """timm family of a model name, read from timm's registry (e.g. 'efficientnet', 'resnet', 'vision_transformer')."""
    timm = require("timm")
    try:
        module = timm.models.get_arch_name(name)  # strips pretrained tag
        return timm.models._registry._model_to_module[module]  # noqa: SLF001 - the registry's own table
    except (KeyError, AttributeError):
        raise UnknownName(f"unknown timm model {name!r}; see `timm.list_models()` for names") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a `.safetensors` or `.pth` checkpoint; returns (state_dict, fsdeploy metadata or {})."""
    torch = require("torch")
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"checkpoint {path} does not exist; pass a .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            meta = {}
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                meta = obj.get(META_KEY, {}) or {}
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise ValueError("not a state dict")
            state = obj
    except FsdeployError:
        raise
    except Exception as exc:
        raise InvalidInput(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            "pass a state dict saved with torch.save or safetensors"
        ) from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def create_backbone(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
) -> tuple[Any, Preprocess]:
    """Build a timm backbone (classifier removed, eval mode) and its preprocessing.

    Args:
        name: any timm model name.
        checkpoint: local `.pth`/`.safetensors` weights; classifier keys are ignored.
        pretrained: use timm's hub weights (needs network access).
        img_size: input resolution; defaults to the checkpoint's, then the model's pretrained_cfg.

    Raises:
        UnknownName: `name` is not a timm model.
        InvalidInput: the checkpoint is unreadable or does not fit the model.
        FsdeployError: pretrained weights could not be downloaded.
    """
    timm = require("timm")
    if not timm.models.is_model(name):
        raise UnknownName(f"unknown timm model {name!r}; try e.g. resnet18, efficientnet_b0, vit_small_patch16_224")
    state, meta = read_checkpoint(checkpoint) if checkpoint is not None else ({}, {})
    if meta.get("model") and meta["model"] != name:
        raise InvalidInput(f"checkpoint {checkpoint} was trained for {meta['model']}, not {name}; export it as {meta['model']} (`fsdeploy export {meta['model']} --checkpoint {checkpoint}`)")
    kwargs: dict[str, Any] = {"num_classes": 0}
    size = img_size or (meta.get("input_size") or [None, None, None])[-1]
    if size and family_of(name) in SIZED_AT_BUILD:
        kwargs["img_size"] = int(size)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained:
            raise FsdeployError(
                f"could not fetch pretrained weights for {name} ({type(exc).__name__}); without network access "
                "pass local weights with --checkpoint FILE instead of --pretrained"
            ) from None
        raise
    if state:
        model_keys = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in model_keys}
        missing = sorted(model_keys - set(state))
        if not state or missing:
            raise InvalidInput(
                f"checkpoint {checkpoint} does not fit {name}: {len(missing)} weights missing "
                f"(first: {', '.join(missing[:3])}); was it saved from another model?"
            )
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise InvalidInput(f"checkpoint {checkpoint} does not fit {name}: {first}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, _preprocess_for(model, meta, size)


def _preprocess_for(model: Any, meta: dict[str, Any], size: int | None) -> Preprocess:
    cfg = dict(model.pretrained_cfg)
    base = Preprocess(
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),  # type: ignore[arg-type]
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )
    known = {k: meta[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in meta}
    if known:
        base = Preprocess.from_dict({**base.to_dict(), **known})
    if size:
        base = replace(base, input_size=(3, int(size), int(size)))
    return base


def save_checkpoint(
    model: Any, path: str | Path, *, name: str, preprocess: Preprocess, fp16: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Atomically write a `.safetensors` checkpoint whose metadata records model name and preprocessing.

    Args:
        model: a torch module (its state_dict is saved) or a state dict.
        path: target file; must end in `.safetensors`.
        name: timm model name.
        preprocess: the eval preprocessing the weights expect.
        fp16: store floating tensors as float16 (halves the size; loaded back as float32).
        extra: more metadata (e.g. training command, data hash).
    """
    torch = require("torch")
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidInput(f"checkpoint path {path} must end in .safetensors")
    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if fp16 and v.is_floating_point():
            v = v.to(torch.float16)
        out[k] = v
    meta = {"model": name, **preprocess.to_dict(), **(extra or {})}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(out, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path
