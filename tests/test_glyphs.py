"""The glyph corpus generator: determinism, disjoint splits, promised instance counts, readable images.

Tests render from a subset of the installed Debian fonts (linked into a temp folder) so each run takes
seconds; the full-corpus promise (>= 1,000 classes with >= 10 typefaces) is checked under -m slow.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fsdeploy.data.glyphs import SPLITS, generate_glyphs, load_splits, plan_classes
from fsdeploy.data.typefaces import SCRIPTS, find_typefaces
from fsdeploy.errors import InvalidInput

FONT_ROOT = Path("/usr/share/fonts/truetype")
SUBSET = (
    "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSerif.ttf", "dejavu/DejaVuSansMono.ttf",
    "freefont/FreeSans.ttf", "freefont/FreeSansBold.ttf", "freefont/FreeSerif.ttf", "freefont/FreeMono.ttf",
    "noto/NotoSans-Regular.ttf", "noto/NotoSerif-Regular.ttf",
    "noto/NotoSansArmenian-Regular.ttf", "noto/NotoSerifArmenian-Regular.ttf",
    "noto/NotoSansHebrew-Regular.ttf", "noto/NotoSerifHebrew-Regular.ttf",
)


def make_font_subset(folder: Path) -> Path:
    """A font folder holding links to a few installed fonts: Latin/Greek/Cyrillic, Armenian and Hebrew designs."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in SUBSET:
        src = FONT_ROOT / rel
        assert src.is_file(), f"{src} missing: apt-get install fonts-noto-core fonts-dejavu-core fonts-freefont-ttf"
        (folder / src.name).symlink_to(src)
    return folder


def tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes, independent of the generator's own digest."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def fonts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_font_subset(tmp_path_factory.mktemp("fonts"))


@pytest.fixture(scope="module")
def corpus(fonts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glyphs") / "c"
    generate_glyphs(out, size=32, seed=0, min_instances=6, max_instances=8, classes=18, font_dirs=[fonts])
    return out


def test_same_seed_gives_identical_files_and_another_seed_does_not(corpus: Path, fonts: Path, tmp_path: Path) -> None:
    again = generate_glyphs(tmp_path / "again", size=32, seed=0, min_instances=6, max_instances=8, classes=18, font_dirs=[fonts])
    other = generate_glyphs(tmp_path / "other", size=32, seed=1, min_instances=6, max_instances=8, classes=18, font_dirs=[fonts])
    assert tree_hash(tmp_path / "again") == tree_hash(corpus)
    assert again.images_sha256 == load_splits(corpus).meta["images_sha256"]
    assert tree_hash(tmp_path / "other") != tree_hash(corpus)
    pngs = sorted(p.relative_to(corpus) for p in corpus.rglob("*.png"))
    assert pngs == sorted(p.relative_to(tmp_path / "other") for p in (tmp_path / "other").rglob("*.png"))
    changed = sum((corpus / p).read_bytes() != (tmp_path / "other" / p).read_bytes() for p in pngs)
    assert changed == len(pngs) == other.images  # the seed moves every image's jitter


def test_splits_are_disjoint_cover_every_folder_and_hold_out_whole_scripts(corpus: Path) -> None:
    splits = load_splits(corpus)
    sets = {s: set(splits.split(s)) for s in SPLITS}
    assert all(sets[s] for s in SPLITS)  # the slice deals classes to every split
    assert not (sets["base"] & sets["val"]) and not (sets["base"] & sets["novel"]) and not (sets["val"] & sets["novel"])
    folders = {p.name for p in corpus.iterdir() if p.is_dir()}
    assert set().union(*sets.values()) == folders and len(folders) == 18
    scripts = {s: {splits.classes[c]["script"] for c in sets[s]} for s in SPLITS}
    assert not (scripts["base"] & scripts["novel"]) and not (scripts["base"] & scripts["val"])
    split_of = {sc.name: sc.split for sc in SCRIPTS}
    for name in folders:  # folder name, code point, script table and split file agree
        cp = int(name.split("_")[0][2:], 16)
        info = splits.classes[name]
        assert info["char"] == chr(cp) and name.endswith("_" + info["script"])
        assert name in sets[split_of[info["script"]]]
        assert unicodedata.category(chr(cp))[0] in "LN"


def test_every_class_has_the_promised_instances_and_images_decode(corpus: Path) -> None:
    splits = load_splits(corpus)
    for folder in (p for p in corpus.iterdir() if p.is_dir()):
        pngs = sorted(folder.glob("*.png"))
        assert 6 <= len(pngs) <= 8, folder.name
        assert len(pngs) == splits.classes[folder.name]["instances"]
        for p in pngs:
            with Image.open(p) as img:
                img.load()
                assert img.size == (32, 32) and img.mode == "L"
                lo, hi = img.getextrema()
                assert hi == 255 and lo < 128  # white page, dark ink
    meta = splits.meta
    assert meta["seed"] == 0 and meta["size"] == 32 and meta["fonts"]
    assert all(len(f["sha256"]) == 64 for f in meta["fonts"])


def test_homoglyphs_and_script_copies_are_not_classes(fonts: Path) -> None:
    plan = {c.codepoint: c for c in plan_classes(find_typefaces([fonts]), min_instances=6)}
    assert 0x41 in plan  # LATIN CAPITAL LETTER A is kept ...
    assert 0x391 not in plan and 0x410 not in plan  # ... GREEK ALPHA and CYRILLIC A draw the same picture
    assert 0x531 in plan and 0x5D0 in plan  # ARMENIAN AYB, HEBREW ALEF
    for cls in plan.values():
        slugs = [f.slug for f in cls.typefaces]
        assert len(slugs) == len(set(slugs)) >= 6
    # the Armenian and Hebrew fonts bundle copies of ASCII digits; those are not counted as designs of '0'
    assert not any("armenian" in f.slug or "hebrew" in f.slug for f in plan[0x30].typefaces)


def test_refuses_to_replace_a_folder_that_is_not_a_corpus(fonts: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not empty"):
        generate_glyphs(tmp_path, classes=3, min_instances=6, font_dirs=[fonts])
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(InvalidInput, match="splits.json not found"):
        load_splits(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"meta": {"generator_version": 999}, "base": [], "val": [], "novel": []}))
    with pytest.raises(InvalidInput, match="generator version 999"):
        load_splits(tmp_path)


def test_cli_writes_a_corpus_and_prints_the_splits(fonts: Path, tmp_path: Path) -> None:
    from fsdeploy.cli import app

    result = CliRunner().invoke(app, ["data", "glyphs", "--out", str(tmp_path / "g"), "--classes", "6", "--img-size", "24",
                                      "--min-instances", "6", "--max-instances", "6", "--font-dir", str(fonts)])
    assert result.exit_code == 0, result.output
    assert "novel" in result.output and "36 images" in result.output
    assert len(list((tmp_path / "g").rglob("*.png"))) == 36


@pytest.mark.slow
def test_installed_fonts_give_a_thousand_classes_of_ten_typefaces() -> None:
    plan = plan_classes(find_typefaces(), min_instances=10)
    assert len(plan) >= 1000
    assert min(len(c.typefaces) for c in plan) >= 10
    assert {c.split for c in plan} == set(SPLITS)


def test_only_splits_renders_a_subset_with_identical_files(corpus: Path, fonts: Path, tmp_path: Path) -> None:
    part = tmp_path / "novel_only"
    generate_glyphs(part, size=32, seed=0, min_instances=6, max_instances=8, classes=18, font_dirs=[fonts], only_splits=("novel",))
    splits = load_splits(part)
    assert splits.novel == load_splits(corpus).novel and splits.novel
    rendered = sorted(p.name for p in part.iterdir() if p.is_dir())
    assert rendered == sorted(splits.novel)
    for name in rendered:
        for png in (part / name).iterdir():
            assert png.read_bytes() == (corpus / name / png.name).read_bytes()
