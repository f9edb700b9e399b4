"""A few-shot corpus rendered from installed typefaces: classes are characters, instances are typefaces.

Omniglot (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic program
induction", Science 2015) is the classic held-out-alphabet few-shot benchmark; it cannot be downloaded here,
so this module makes an offline stand-in from Debian font packages (fonts-noto-core, fonts-dejavu-core,
fonts-freefont-ttf). A class is one Unicode letter or digit; an instance is that character drawn by one
typeface (a font family in its regular or bold upright style), with mild seeded affine and stroke jitter.
Whole scripts are held out: novel classes come from alphabets the base split never shows.

Two clean-up rules keep labels honest. A typeface whose drawing of a character is pixel-identical to an
earlier typeface's (fonts often copy Latin glyphs) is dropped from that class, so instances are distinct
drawings. A character drawn identically to a lower code point in at least half of the typefaces they share
(Latin A, Greek Alpha, Cyrillic A) is dropped, so no two classes are the same picture.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from PIL import __version__ as PIL_VERSION

from fsdeploy.atomic import atomic_dir, sha256_file
from fsdeploy.data.typefaces import DEFAULT_FONT_DIRS, FONT_PACKAGES, Typeface, find_typefaces, is_class_character, script_table
from fsdeploy.errors import InvalidInput

GENERATOR_VERSION = 1
SPLITS = ("base", "val", "novel")
ANALYSIS_SIZE = 32  # px; duplicate detection runs at this fixed size so the class list does not depend on --size
EM_FRACTION = 0.62  # font size as a fraction of the image side
FIT_FRACTION = 0.86  # glyphs larger than this fraction of the side are drawn smaller
MAX_ROTATION_DEG = 8.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT = 0.06  # fraction of the side
MIN_SCRIPT_COVERAGE = 0.2  # a typeface draws a script only if it covers this share of it (see plan_classes)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GlyphClass:
    """One character and the typefaces that draw it distinctly, in instance order."""

    codepoint: int
    script: str
    split: str
    typefaces: tuple[Typeface, ...]

    @property
    def folder(self) -> str:
        return f"U+{self.codepoint:04X}_{self.script}"


@dataclass(frozen=True)
class GlyphCorpus:
    """What `generate_glyphs` wrote."""

    root: Path
    classes_per_split: dict[str, int]
    images: int
    instances_min: int
    instances_max: int
    families_min: int  # distinct font families behind the smallest class (instances count family x style)
    classes_per_script: dict[str, int]
    typefaces: int
    images_sha256: str
    seconds: float


@dataclass(frozen=True)
class GlyphSplits:
    """The split file of a corpus: class folder names per split, per-class facts, generator metadata."""

    base: tuple[str, ...]
    val: tuple[str, ...]
    novel: tuple[str, ...]
    classes: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def split(self, name: str) -> tuple[str, ...]:
        """Class folder names of split `name` ('base', 'val' or 'novel')."""
        if name not in SPLITS:
            raise InvalidInput(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


class _Fonts:
    """FreeType faces loaded on demand, one per (file, pixel size); lives for one generator call."""

    def __init__(self) -> None:
        self._faces: dict[tuple[Path, int], ImageFont.FreeTypeFont] = {}

    def get(self, path: Path, px: int) -> ImageFont.FreeTypeFont:
        key = (path, px)
        if key not in self._faces:
            # BASIC layout maps a character straight through the cmap: no shaping engine, so output does not
            # depend on whether Pillow was built with libraqm.
            self._faces[key] = ImageFont.truetype(str(path), px, layout_engine=ImageFont.Layout.BASIC)
        return self._faces[key]


def _render_clean(fonts: _Fonts, face: Typeface, ch: str, side: int) -> Image.Image | None:
    """The glyph as white ink on black, ink box centred in a `side` square; None when the glyph is blank."""
    em = max(4, round(side * EM_FRACTION))
    font = fonts.get(face.path, em)
    left, top, right, bottom = font.getbbox(ch)
    extent = max(right - left, bottom - top)
    if extent <= 0:
        return None
    if extent > FIT_FRACTION * side:
        font = fonts.get(face.path, max(4, math.floor(em * FIT_FRACTION * side / extent)))
        left, top, right, bottom = font.getbbox(ch)
    img = Image.new("L", (side, side), 0)
    origin = (round((side - (right - left)) / 2 - left), round((side - (bottom - top)) / 2 - top))
    ImageDraw.Draw(img).text(origin, ch, font=font, fill=255)
    return img if img.getbbox() else None


def _signature(img: Image.Image) -> bytes:
    """Translation-invariant fingerprint of a clean render: the ink box's size and pixels."""
    box = img.getbbox()
    crop = img.crop(box)
    return hashlib.blake2b(bytes(str(crop.size), "ascii") + crop.tobytes(), digest_size=16).digest()


def plan_classes(
    typefaces: Sequence[Typeface],
    *,
    min_instances: int = 10,
    max_instances: int | None = None,
    classes: int | None = None,
    progress: Progress | None = None,
) -> tuple[GlyphClass, ...]:
    """Decide which characters become classes and which typefaces draw each; renders nothing to disk.

    Args:
        typefaces: from `find_typefaces`; their order is the instance order.
        min_instances: drop characters with fewer distinct drawings than this.
        max_instances: keep at most this many typefaces per class (the first ones).
        classes: keep only this many classes, shared evenly across the splits and spread over code points.
        progress: called as progress("analyse", done, total).
    """
    scripts = script_table()
    per_script: dict[str, set[int]] = defaultdict(set)
    for face in typefaces:
        for cp in face.codepoints:
            if cp in scripts and is_class_character(cp):
                per_script[scripts[cp].name].add(cp)
    candidates: dict[int, list[int]] = defaultdict(list)
    for t, face in enumerate(typefaces):
        for cps in per_script.values():
            # Fonts for one script often bundle copies of ASCII digits or basic Latin: those are not designs.
            if len(face.codepoints & cps) >= MIN_SCRIPT_COVERAGE * len(cps):
                for cp in face.codepoints & cps:
                    candidates[cp].append(t)
    candidates = {cp: sorted(ts) for cp, ts in sorted(candidates.items()) if len(ts) >= min_instances}
    fonts = _Fonts()
    sigs: dict[int, dict[int, bytes]] = {}
    for done, (cp, ts) in enumerate(candidates.items(), 1):
        sigs[cp] = {}
        for t in ts:
            img = _render_clean(fonts, typefaces[t], chr(cp), ANALYSIS_SIZE)
            if img is not None:
                sigs[cp][t] = _signature(img)
        if progress is not None and (done % 100 == 0 or done == len(candidates)):
            progress("analyse", done, len(candidates))
    dropped = _homoglyphs(sigs)
    plan: list[GlyphClass] = []
    for cp, by_face in sigs.items():
        if cp in dropped:
            continue
        seen: set[bytes] = set()
        keep: list[Typeface] = []
        for t, sig in by_face.items():
            if sig not in seen:
                seen.add(sig)
                keep.append(typefaces[t])
        if len(keep) < min_instances:
            continue
        script = scripts[cp]
        plan.append(GlyphClass(cp, script.name, script.split, tuple(keep[:max_instances])))
    return tuple(plan) if classes is None else _even_slice(plan, classes)


def _homoglyphs(sigs: dict[int, dict[int, bytes]]) -> set[int]:
    """Code points drawn like a lower code point in at least half of the typefaces drawing both."""
    by_drawing: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for cp, by_face in sigs.items():
        for t, sig in by_face.items():
            by_drawing[(t, sig)].append(cp)
    same: dict[tuple[int, int], int] = defaultdict(int)
    for cps in by_drawing.values():
        for i, a in enumerate(cps):
            for b in cps[i + 1 :]:
                same[(a, b)] += 1
    dropped = set()
    for (a, b), n_same in same.items():
        shared = len(sigs[a].keys() & sigs[b].keys())
        if 2 * n_same >= shared:
            dropped.add(max(a, b))
    return dropped


def _even_slice(plan: Sequence[GlyphClass], n: int) -> tuple[GlyphClass, ...]:
    """`n` classes: dealt round-robin over the splits, evenly spaced over code points within each split."""
    per_split = {s: [c for c in plan if c.split == s] for s in SPLITS}
    quota = dict.fromkeys(SPLITS, 0)
    left = n
    while left > 0 and any(quota[s] < len(per_split[s]) for s in SPLITS):
        for s in SPLITS:
            if left > 0 and quota[s] < len(per_split[s]):
                quota[s] += 1
                left -= 1
    picked = [per_split[s][j * len(per_split[s]) // quota[s]] for s in SPLITS for j in range(quota[s])]
    return tuple(sorted(picked, key=lambda c: c.codepoint))


def _render_instance(fonts: _Fonts, cls: GlyphClass, face: Typeface, *, size: int, seed: int) -> Image.Image:
    """One corpus image: black glyph on white, `size` square, L mode, with seeded affine and stroke jitter.

    The jitter is drawn from a generator keyed by (seed, code point, typeface), so an image does not depend
    on which other classes or typefaces are generated alongside it.
    """
    rng = np.random.default_rng([seed, cls.codepoint, zlib.crc32(face.slug.encode())])
    big = 2 * size  # draw at twice the size, then box-downsample: smooth edges and sub-pixel stroke jitter
    img = _render_clean(fonts, face, chr(cls.codepoint), big)
    if img is None:  # plan_classes kept only typefaces with ink at ANALYSIS_SIZE; a blank here is a font bug
        raise InvalidInput(f"{face.path} draws {cls.folder} blank at {size}px; pass a larger --size")
    stroke = rng.integers(3)
    if stroke == 1:
        img = img.filter(ImageFilter.MaxFilter(3))
    elif stroke == 2:
        thinner = img.filter(ImageFilter.MinFilter(3))
        ink = np.asarray(img, dtype=np.int64).sum()
        if np.asarray(thinner, dtype=np.int64).sum() >= 0.5 * ink:  # never erode hairlines away
            img = thinner
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    scale = rng.uniform(*SCALE_RANGE)
    shift_x, shift_y = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * big
    # PIL's affine maps output to input pixels: the inverse of rotate-scale about the centre, then shift.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    centre = big / 2
    cx, cy = centre + shift_x, centre + shift_y
    matrix = (cos, sin, centre - cos * cx - sin * cy, -sin, cos, centre + sin * cx - cos * cy)
    img = img.transform((big, big), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return Image.eval(img.reduce(2), lambda v: 255 - v)


def generate_glyphs(
    out: str | Path,
    *,
    size: int = 64,
    seed: int = 0,
    min_instances: int = 10,
    max_instances: int | None = None,
    classes: int | None = None,
    styles_per_family: int = 2,
    font_dirs: Sequence[str | Path] = DEFAULT_FONT_DIRS,
    overwrite: bool = False,
    only_splits: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> GlyphCorpus:
    """Render the corpus to `out/<U+XXXX_script>/<typeface>.png` plus `out/splits.json`, atomically.

    Same fonts, seed and options give byte-identical files. `classes`/`max_instances` make small slices.

    Raises:
        InvalidInput: bad options, no fonts, or `out` exists and is not a glyph corpus (or overwrite is off).
    """
    start = time.perf_counter()
    if size < 16:
        raise InvalidInput(f"--size {size} is too small to draw characters; use 16 or more (64 is the default)")
    if min_instances < 1 or (max_instances is not None and max_instances < min_instances):
        raise InvalidInput(f"need 1 <= min_instances <= max_instances; got {min_instances} and {max_instances}")
    out = Path(out)
    is_corpus = (out / "splits.json").is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite and is_corpus):
        what = "a glyph corpus; pass --overwrite to replace it" if is_corpus else "not empty"
        raise InvalidInput(f"{out} exists and is {what} (or choose a new --out folder)")
    faces = find_typefaces(font_dirs, styles_per_family=styles_per_family)
    plan = plan_classes(faces, min_instances=min_instances, max_instances=max_instances, classes=classes, progress=progress)
    if not plan:
        raise InvalidInput(
            f"no character is drawn by {min_instances} distinct typefaces; lower --min-instances or install "
            f"more fonts (apt-get install {' '.join(FONT_PACKAGES)})"
        )
    # `only_splits` renders a subset (e.g. the demo needs only novel classes); splits.json still lists every class
    rendered = [c for c in plan if only_splits is None or c.split in only_splits]
    total = sum(len(c.typefaces) for c in rendered)
    fonts = _Fonts()
    digest = hashlib.sha256()
    done = 0
    with atomic_dir(out) as tmp:
        for cls in rendered:
            (tmp / cls.folder).mkdir()
            for face in cls.typefaces:
                buf = io.BytesIO()
                _render_instance(fonts, cls, face, size=size, seed=seed).save(buf, format="PNG", compress_level=6)
                rel = f"{cls.folder}/{face.slug}.png"
                (tmp / rel).write_bytes(buf.getvalue())
                digest.update(f"{rel}\0{hashlib.sha256(buf.getvalue()).hexdigest()}\n".encode())
                done += 1
                if progress is not None and (done % 200 == 0 or done == total):
                    progress("render", done, total)
        meta = {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "size": size,
            "min_instances": min_instances,
            "max_instances": max_instances,
            "classes": classes,
            "styles_per_family": styles_per_family,
            "rendered_splits": list(only_splits) if only_splits is not None else list(SPLITS),
            "jitter": {"rotation_deg": MAX_ROTATION_DEG, "scale": list(SCALE_RANGE), "shift": MAX_SHIFT, "stroke": "3x3 min/max at 2x"},
            "polarity": "black glyph on white, 8-bit grayscale PNG",
            "pillow": PIL_VERSION,
            "freetype": ImageFont.core.freetype2_version,
            "font_packages": list(FONT_PACKAGES),
            "fonts": [
                {"family": f.family, "style": f.style, "path": str(f.path.relative_to(f.font_dir)), "font_dir": str(f.font_dir), "sha256": sha256_file(f.path)}
                for f in faces
            ],
            "images_sha256": digest.hexdigest(),
        }
        split_file = {s: [c.folder for c in plan if c.split == s] for s in SPLITS}
        split_file["classes"] = {
            c.folder: {"char": chr(c.codepoint), "name": unicodedata.name(chr(c.codepoint), ""), "script": c.script, "split": c.split, "instances": len(c.typefaces)}
            for c in plan
        }
        split_file["meta"] = meta
        (tmp / "splits.json").write_text(json.dumps(split_file, indent=1, sort_keys=True), encoding="utf-8")
    counts = [len(c.typefaces) for c in rendered]
    per_script: dict[str, int] = defaultdict(int)
    for c in plan:
        per_script[c.script] += 1
    return GlyphCorpus(
        root=out,
        classes_per_split={s: len(split_file[s]) for s in SPLITS},
        images=total,
        instances_min=min(counts),
        instances_max=max(counts),
        families_min=min(len({f.family for f in c.typefaces}) for c in plan),
        classes_per_script=dict(per_script),
        typefaces=len({f.slug for c in plan for f in c.typefaces}),
        images_sha256=meta["images_sha256"],
        seconds=time.perf_counter() - start,
    )


def load_splits(root: str | Path) -> GlyphSplits:
    """Read `root/splits.json` written by `generate_glyphs`.

    Raises:
        InvalidInput: the file is missing, unreadable, or from another generator version.
    """
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise InvalidInput(f"{path} not found; make a corpus with `fsdeploy data glyphs --out {root}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        version = raw["meta"]["generator_version"]
        splits = {s: tuple(raw[s]) for s in SPLITS}
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a glyph split file ({type(exc).__name__}: {exc}); regenerate the corpus") from None
    if version != GENERATOR_VERSION:
        raise InvalidInput(f"{path} comes from generator version {version}, this fsdeploy reads {GENERATOR_VERSION}; regenerate the corpus")
    return GlyphSplits(**splits, classes=raw.get("classes", {}), meta=raw["meta"])
