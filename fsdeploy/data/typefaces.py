"""The installed typefaces and the alphabets the glyph corpus draws from (`fsdeploy.data.glyphs`).

A typeface is one font file standing for a family in one style; a script is an alphabet with the split
(base / val / novel) all its characters go to, so whole alphabets are held out.
"""
from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fsdeploy.deps import require
from fsdeploy.errors import InvalidInput

DEFAULT_FONT_DIRS = ("/usr/share/fonts",)
FONT_PACKAGES = ("fonts-noto-core", "fonts-dejavu-core", "fonts-freefont-ttf")
LETTER_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Nd"})  # Lm (modifier letters) are tiny marks: left out


@dataclass(frozen=True)
class Script:
    """An alphabet: its code-point ranges and the split all its characters go to."""

    name: str
    split: str
    ranges: tuple[tuple[int, int], ...]


# Base: the big, typeface-rich alphabets. Val and novel: whole alphabets the backbone never sees in training.
SCRIPTS: tuple[Script, ...] = (
    Script("latin", "base", ((0x30, 0x39), (0x41, 0x24F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF))),
    Script("greek", "base", ((0x370, 0x3FF), (0x1F00, 0x1FFF))),
    Script("cyrillic", "base", ((0x400, 0x52F), (0x1C80, 0x1C8F), (0xA640, 0xA69F))),
    Script("coptic", "base", ((0x2C80, 0x2CFF),)),
    Script("hebrew", "val", ((0x590, 0x5FF),)),
    Script("tifinagh", "val", ((0x2D30, 0x2D7F),)),
    Script("lao", "val", ((0xE80, 0xEFF),)),
    Script("thai", "val", ((0xE00, 0xE7F),)),
    Script("devanagari", "val", ((0x900, 0x97F),)),
    Script("bengali", "val", ((0x980, 0x9FF),)),
    Script("armenian", "novel", ((0x530, 0x58F),)),
    Script("georgian", "novel", ((0x10A0, 0x10FF), (0x1C90, 0x1CBF), (0x2D00, 0x2D2F))),
    Script("arabic", "novel", ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF))),
    Script("ethiopic", "novel", ((0x1200, 0x139F), (0x2D80, 0x2DDF))),
    Script("cherokee", "novel", ((0x13A0, 0x13FF), (0xAB70, 0xABBF))),
    Script("gurmukhi", "novel", ((0xA00, 0xA7F),)),
)


@dataclass(frozen=True)
class Typeface:
    """One font file standing for a family in one style; `codepoints` is its cmap."""

    family: str
    style: str  # "regular" or "bold"
    path: Path
    font_dir: Path
    codepoints: frozenset[int] = field(repr=False, compare=False)

    @property
    def slug(self) -> str:
        """Filesystem-safe instance name, e.g. 'noto-serif-armenian-bold'."""
        base = "".join(c if c.isalnum() else "-" for c in self.family.lower()).strip("-")
        return base if self.style == "regular" else f"{base}-{self.style}"


def find_typefaces(font_dirs: Sequence[str | Path] = DEFAULT_FONT_DIRS, *, styles_per_family: int = 2) -> tuple[Typeface, ...]:
    """Pick, per font family, its upright regular file and (if `styles_per_family` is 2) its bold one.

    Families come from the fonts' own name tables (typographic family), so weights, widths and italics of
    one design count as one family. Raises InvalidInput when no font files are found.
    """
    ttlib = require("fontTools.ttLib")
    if styles_per_family not in (1, 2):
        raise InvalidInput(f"styles_per_family must be 1 (regular) or 2 (regular + bold), got {styles_per_family}")
    families: dict[str, list[tuple[Path, Path, int, int, bool]]] = defaultdict(list)
    for root in map(Path, font_dirs):
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf")):
            font = ttlib.TTFont(str(path), lazy=True)
            name, os2 = font["name"], font["OS/2"]
            family = name.getDebugName(16) or name.getDebugName(1) or path.stem
            sub = (name.getDebugName(17) or name.getDebugName(2) or "").lower()
            italic = bool(os2.fsSelection & 1) or "italic" in sub or "oblique" in sub
            families[family].append((path, root, os2.usWeightClass, os2.usWidthClass, italic))
    if not families:
        raise InvalidInput(
            f"no .ttf/.otf fonts under {', '.join(map(str, font_dirs))}; install them: "
            f"apt-get install {' '.join(FONT_PACKAGES)}"
        )
    chosen: list[Typeface] = []
    for family in sorted(families):
        files = [f for f in families[family] if not f[4]] or families[family]
        files = [f for f in files if f[3] == 5] or files  # normal width before condensed
        regular = min(files, key=lambda f: (abs(f[2] - 400), str(f[0])))
        picks = [("regular", regular)]
        bolds = [f for f in files if f[2] >= 600 and f is not regular]
        if styles_per_family == 2 and bolds:
            picks.append(("bold", min(bolds, key=lambda f: (abs(f[2] - 700), str(f[0])))))
        for style, (path, root, *_rest) in picks:
            cmap = ttlib.TTFont(str(path), lazy=True).getBestCmap() or {}
            chosen.append(Typeface(family, style, path, root, frozenset(cmap)))
    return tuple(chosen)


def script_table() -> dict[int, Script]:
    """Script of every code point the corpus draws from."""
    return {cp: s for s in SCRIPTS for lo, hi in s.ranges for cp in range(lo, hi + 1)}


def is_class_character(cp: int) -> bool:
    """A letter or digit that NFKC leaves alone: one class of the corpus."""
    ch = chr(cp)
    # NFKC-unstable characters (ligatures, presentation forms, Kelvin sign) duplicate another class.
    return unicodedata.category(ch) in LETTER_CATEGORIES and unicodedata.normalize("NFKC", ch) == ch
