"""Inputs the benchmarks build once and reuse: bundles, stand-in weights, real-image folders, a glyph corpus.

Everything lands in one work folder and is reused on the next run when it still matches (same model,
adapter, input size and checkpoint hash), so repeated benchmark runs spend their time measuring.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdeploy.atomic import sha256_file
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.bundle import Bundle, load_bundle

Say = Callable[[str], None]


@dataclass(frozen=True)
class Weights:
    """A checkpoint file (None: timm's random init) and how to describe it in a report."""

    path: Path | None
    description: str


def unit_scale_checkpoint(model: str, img_size: int, path: str | Path, *, seed: int = 0) -> Path:
    """Save a random-init `model` whose norm layers carry O(1) statistics (γ ~ U(0.5, 1.5), β, running stats).

    timm zero-initialises the last BatchNorm of each residual block and EfficientNet's features come out
    near 1e-6 at random init; a head fitted on such features decides by rounding noise, so agreement
    between two backends would say nothing. Re-drawing the norm statistics gives features of unit scale.
    The file is written once and reused (timm's init draws from torch's global generator).
    """
    from fsdeploy.backbones import create_backbone, save_checkpoint

    path = Path(path)
    if path.is_file():
        return path
    net, pre = create_backbone(model, img_size=img_size)
    unit_scale_norms_(net, seed)
    return save_checkpoint(net, path, name=model, preprocess=pre, extra={"note": "random init, unit-scale norm statistics"})


def unit_scale_norms_(model: Any, seed: int = 0) -> Any:
    """Re-draw BatchNorm/LayerNorm affine and running statistics in place so activations are O(1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def pick_weights(
    model: str, workdir: Path, img_size: int, checkpoint: Path | None = None, *, adapter: str = "none"
) -> Weights:
    """`checkpoint` if given, else fsdeploy's shipped glyph checkpoint when it ships one for `model` at this input
    size (for a `case` bundle: the shipped meta-trained CaSE checkpoint when there is one), else a unit-scale
    random-init stand-in.

    The shipped checkpoints are trained on small glyphs (32 or 64 px); run at 224 px their activations leave the
    range their BatchNorm statistics describe, so timing and agreement runs at other sizes use the stand-in
    (speed does not depend on the weights' values).
    """
    if checkpoint is not None:
        return Weights(Path(checkpoint), f"{Path(checkpoint).name}")
    from fsdeploy.weights import shipped, shipped_checkpoint

    why = "no pretrained weights available"
    record = shipped(model)
    if record is not None:
        try:
            path = shipped_checkpoint(model)
        except InvalidInput:
            pass
        else:
            case = path.with_name(record.case_file) if record.case_file else None
            if img_size == record.img_size and adapter == "case" and case is not None and case.is_file():
                return Weights(case, "shipped glyph-pretrained checkpoint with meta-trained CaSE blocks")
            if img_size == record.img_size:
                return Weights(path, "shipped glyph-pretrained checkpoint")
            why = f"the shipped checkpoint is trained at {record.img_size} px"
    path = unit_scale_checkpoint(model, img_size, workdir / f"{model}-random-init-{img_size}px.safetensors")
    return Weights(path, f"random init (unit-scale norm statistics; {why})")


def prepare_bundle(
    workdir: Path, model: str, *, adapter: str = "none", img_size: int, weights: Weights, say: Say = print,
    base_data: Path | None = None, options: dict[str, Any] | None = None,
) -> Bundle:
    """The bundle `workdir/<model>-<adapter>-<img_size>px`, exported (and validated) only when missing or stale.

    With `base_data` (a glyph corpus: its base split, else every class), a plain bundle also gets the base-class
    mean feature SimpleShot centres on, computed once per bundle. `options` go to the adapter's builder (e.g. a
    TOAST bundle's `backbone_checkpoint`).
    """
    from fsdeploy.pipeline.export import export_bundle

    def with_mean(b: Bundle) -> Bundle:
        if base_data is None or adapter != "none" or b.manifest.extra.get("base_mean", {}).get("source") == str(base_data):
            return b
        from fsdeploy.pipeline.base_mean import add_base_mean, split_classes as base_split

        say(f"computing the base-class mean feature of {base_data} for {folder}")
        return add_base_mean(b, base_data, classes=base_split(base_data, "base"))

    folder = Path(workdir) / f"{model}-{adapter}-{img_size}px"
    digest = sha256_file(weights.path) if weights.path else None
    try:
        b = load_bundle(folder)
        m = b.manifest
        if (m.model, m.adapter, m.preprocess.input_size[-1], m.source.get("checkpoint_sha256")) == (
            model, adapter, img_size, digest,
        ):
            return with_mean(b)
    except BundleError:
        pass
    say(f"exporting {model} (adapter {adapter}, {img_size} px, {weights.description}) to {folder}")
    bundle, _ = export_bundle(model, folder, adapter=adapter, checkpoint=weights.path, img_size=img_size, overwrite=True,
                              options=options)
    return with_mean(bundle)


def photo_folder(workdir: Path, name: str, *, classes: int, per_class: int, seed: int) -> Path:
    """`workdir/<name>`: an ImageFolder of real-photo JPEG crops, written once (see measure.write_photo_folder)."""
    from fsdeploy.bench.measure import write_photo_folder

    folder = Path(workdir) / name
    marker = folder / ".complete"
    if not marker.is_file():
        write_photo_folder(folder, classes=classes, per_class=per_class, seed=seed)
        marker.write_text(f"{classes} x {per_class}, seed {seed}\n")
    return folder


def glyph_corpus(workdir: Path, data: Path | None, *, classes: int = 300, say: Say = print) -> Path:
    """`data` when given, else a glyph corpus slice of `classes` classes rendered once into `workdir/glyphs`.

    A slice keeps the full corpus's split by script, so its novel classes are novel for the shipped backbone.
    """
    if data is not None:
        return Path(data)
    from fsdeploy.data.glyphs import generate_glyphs

    folder = Path(workdir) / "glyphs"
    if not (folder / "splits.json").is_file():
        say(f"rendering a {classes}-class glyph corpus into {folder} (once)")
        generate_glyphs(folder, classes=classes)
    return folder


def split_classes(corpus: Path, split: str) -> list[str] | None:
    """Class folders of `split` from `corpus/splits.json`; None (every class) for 'all' or a folder without one."""
    from fsdeploy.data.folders import split_classes as listed

    return listed(corpus, split)
