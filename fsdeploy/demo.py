"""The main job on the embedded default, end to end: corpus -> export -> ONNX Runtime -> numpy heads.

Uses only what ships or is installed: the glyph corpus rendered from Debian fonts, the efficientnet_b0
checkpoint pretrained on its base classes (fsdeploy/weights), and ONNX Runtime on the CPU. Accuracy is
measured on novel classes the backbone never saw.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsdeploy.bench.accuracy import AccuracyRow, evaluate
from fsdeploy.bench.methods import accuracy_methods, default_heads
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.glyphs import generate_glyphs, load_splits
from fsdeploy.engines import EngineOptions
from fsdeploy.atomic import sha256_file
from fsdeploy.errors import FsdeployError, InvalidInput
from fsdeploy.bundle import Bundle, load_bundle
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.weights import DEFAULT_IMG_SIZE, DEFAULT_MODEL, default_checkpoint

# the adapter kinds' default head methods, under the cost table's labels (`fsdeploy.bench.methods`); LT+NCC
# (a 1280x1280 map, 40 Adadelta steps) takes seconds per task here: see `fsdeploy bench accuracy --heads`
HEAD_METHODS = tuple(accuracy_methods(default_heads("none"), "none"))
CASE_METHODS = tuple(accuracy_methods(default_heads("case"), "case"))



@dataclass(frozen=True)
class DemoResult:
    rows: list[AccuracyRow]
    pretrained: bool
    case_source: str
    corpus: Path
    novel_classes: int


DEMO_SPLITS = ("novel", "base")  # novel: the episodes; base: SimpleShot's mean feature (the backbone's training classes)


def ensure_corpus(folder: Path, say: Callable[[str], None]) -> Path:
    """Render the novel and base classes of the glyph corpus once (default settings: the split the shipped backbone was trained with)."""
    if (folder / "splits.json").is_file():
        rendered = load_splits(folder).meta.get("rendered_splits") or []
        if all(s in rendered for s in DEMO_SPLITS):
            return folder
        say(f"re-rendering {folder} with the base classes too (SimpleShot's base-class mean needs them)")
        generate_glyphs(folder, only_splits=DEMO_SPLITS, overwrite=True)
        return folder
    say(f"rendering the novel and base classes of the glyph corpus into {folder} (once)")
    generate_glyphs(folder, only_splits=DEMO_SPLITS)
    return folder


def _reuse_or_export(folder: Path, adapter: str, ckpt: Path | None, say: Callable[[str], None]) -> Bundle:
    """Reuse a bundle from an earlier demo run when it was exported from the same weights; else export."""
    try:
        old = load_bundle(folder)
        if old.manifest.adapter == adapter and old.manifest.source.get("checkpoint_sha256") == (sha256_file(ckpt) if ckpt else None):
            say(f"reusing {folder} (same weights)")
            return old
    except FsdeployError:
        pass
    say(f"exporting {DEFAULT_MODEL} (adapter {adapter}) to {folder}")
    return export_bundle(DEFAULT_MODEL, folder, adapter=adapter, checkpoint=ckpt, img_size=DEFAULT_IMG_SIZE, overwrite=True)[0]


def run_demo(
    workdir: str | Path,
    *,
    episodes: int = 100,
    ways: int = 5,
    shots: tuple[int, ...] = (1, 5),
    queries: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    say: Callable[[str], None] = print,
    tick: Callable[[int], None] | None = None,
) -> DemoResult:
    """Export plain and CaSE bundles of the default backbone and evaluate every head on novel classes."""
    workdir = Path(workdir)
    corpus = ensure_corpus(workdir / "glyphs", say)
    splits = load_splits(corpus)
    data = scan_image_folder(corpus, classes=list(splits.novel))
    try:
        ckpt: Path | None = default_checkpoint()
    except InvalidInput:
        ckpt = None
        say("no shipped checkpoint found: using a RANDOMLY INITIALISED backbone (accuracy will be near chance)")
    case_ckpt = Path(__file__).parent / "weights" / "efficientnet_b0_glyphs_case.safetensors"
    case_source = "meta-trained CaSE" if case_ckpt.is_file() else "identity CaSE (no meta-trained CaSE weights shipped)"
    say(f"backbone: {DEFAULT_MODEL}, {'pretrained on glyph base classes' if ckpt else 'random init'}; CaSE: {case_source}")
    plain = _reuse_or_export(workdir / "bundle", "none", ckpt, say)
    if plain.manifest.extra.get("base_mean", {}).get("source") != str(corpus):
        from fsdeploy.pipeline.base_mean import add_base_mean

        say(f"computing the base-class mean feature over the {len(splits.base)} base classes (SimpleShot centres on it)")
        plain = add_base_mean(plain, corpus, classes=list(splits.base), threads=threads)
    case = _reuse_or_export(workdir / "bundle-case", "case", case_ckpt if case_ckpt.is_file() else ckpt, say)
    options = EngineOptions(threads=threads)
    rows: list[AccuracyRow] = []
    fewest = int(min(np.bincount(data.labels)))
    for k in shots:
        # the corpus promises >= 10 typefaces per class: queries take what the shots leave, up to 15
        q = queries if queries is not None else max(1, min(15, fewest - k))
        common = dict(ways=ways, shots=k, queries=q, episodes=episodes, seed=seed + k, options=options, progress=tick)
        rows += evaluate(plain, data, HEAD_METHODS, label="effnet_b0", **common)
        rows += evaluate(case, data, CASE_METHODS, label="effnet_b0+CaSE", **common)
    return DemoResult(rows, ckpt is not None, case_source, corpus, len(splits.novel))
