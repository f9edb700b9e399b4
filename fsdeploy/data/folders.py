"""Find labelled images on disk: ImageFolder trees (one sub-folder per class) and file lists.

Every problem is reported up front, naming the files, so a long adaptation never fails half-way.
"""
from __future__ import annotations

import json

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fsdeploy.errors import InvalidInput

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class LabelledFiles:
    """Image paths with integer labels; `classes[label]` is the class name (the folder name)."""

    paths: tuple[Path, ...]
    labels: NDArray[np.int64]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: NDArray[np.int64] | list[int]) -> LabelledFiles:
        """Rows `index`, keeping the class table."""
        idx = np.asarray(index, dtype=np.int64)
        return LabelledFiles(tuple(self.paths[i] for i in idx), self.labels[idx], self.classes)


def scan_image_folder(root: str | Path, *, min_classes: int = 2, classes: list[str] | None = None) -> LabelledFiles:
    """List an ImageFolder tree: `root/<class>/<image>`, classes sorted by name.

    Args:
        root: the folder holding one sub-folder per class.
        min_classes: fewer classes than this is an error (a classifier needs two).
        classes: keep only these class folders (e.g. one split of a corpus).

    Raises:
        InvalidInput: root missing or empty, a class folder without images, too few classes,
            or non-image files (all named in the message).
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder; pass a folder with one sub-folder of images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        wanted = set(classes)
        class_dirs = [p for p in class_dirs if p.name in wanted]
    if not class_dirs:
        raise InvalidInput(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/")
    if len(class_dirs) < min_classes:
        raise InvalidInput(
            f"{root} has {len(class_dirs)} class folder ({class_dirs[0].name}); a few-shot task needs at least "
            f"{min_classes} classes, one sub-folder each"
        )
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    foreign: list[str] = []
    broken: list[str] = []
    for label, d in enumerate(class_dirs):
        # images in nested sub-folders belong to their top-level class folder (e.g. class/session1/img.png)
        found = _walk(d)
        broken += [str(p) for p in found if p.is_symlink() and not p.exists()]
        files = sorted(p for p in found if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        foreign += [str(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            empty.append(d.name)
        paths += images
        labels += [label] * len(images)
    if broken:
        raise InvalidInput(f"broken symlink(s) in {root}: {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}; fix or remove them")
    if empty:
        raise InvalidInput(f"class folder(s) with no images in {root}: {', '.join(empty)}; add images or remove the folder")
    if foreign:
        raise InvalidInput(
            f"non-image files in {root}: {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; "
            f"remove them (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return LabelledFiles(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(d.name for d in class_dirs))


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden entry that is not a folder, under `folder` and its non-hidden sub-folders (symlinked folders followed)."""
    out: list[Path] = []
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for n in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, n))
            if not n.startswith(".") and real not in seen:  # a symlink loop is walked once
                seen.add(real)
                keep.append(n)
        dirnames[:] = keep
        out += [Path(dirpath) / n for n in filenames if not n.startswith(".")]
    return out


def list_images(items: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, image suffixes only) into a sorted list of image paths.

    Raises:
        InvalidInput: an item does not exist, a folder holds broken symlinks, or no images were found.
    """
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = _walk(item)
            broken = [str(p) for p in found if p.is_symlink() and not p.exists()]
            if broken:
                raise InvalidInput(f"broken symlink(s) in {item}: {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}; fix or remove them")
            out += sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            out.append(item)
        else:
            raise InvalidInput(f"{item} does not exist; pass image files or folders of images")
    if not out:
        raise InvalidInput(f"no images found in {', '.join(map(str, items))}")
    return out


def split_classes(folder: str | Path, split: str, *, required: bool = False, option: str = "--split") -> list[str] | None:
    """Class folders listed under `split` in `folder/splits.json` (a glyph corpus writes one); None (every class)
    for 'all', or when the folder has no split file and `required` is False.

    Raises:
        InvalidInput: the file is not JSON or has no such split, or (with `required`) there is no file.
    """
    path = Path(folder) / "splits.json"
    if split == "all":
        return None
    if not path.is_file():
        if required:
            raise InvalidInput(f"{option} {split}: {folder} has no splits.json to look it up in; pass {option} all (every class)")
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc}); fix it, or pass {option} all") from None
    if not isinstance(raw, dict) or not isinstance(raw.get(split), list):
        known = sorted(k for k, v in raw.items() if isinstance(v, list)) if isinstance(raw, dict) else []
        raise InvalidInput(f"{path} has no split {split!r} (it has {', '.join(known) or 'none'}); pass {option}")
    return [str(c) for c in raw[split]]
