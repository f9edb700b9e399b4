"""Checks on an output path before any work starts: never replace what fsdeploy did not write.

`export --out` may replace only an fsdeploy bundle, and only when asked (`--force`); a folder of user files,
a regular file or a symlink is refused. `adapt --out` may replace only a task artefact. Both check that the
folder is writable first, so a long run does not fail at its last step.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fsdeploy import stale
from fsdeploy.errors import InvalidInput
LOCK_FILE = ".manifest.lock"  # written by fsdeploy before bundles locked their folder itself; counts as its own

MANIFEST = "manifest.json"  # the name fsdeploy.bundle writes


def _check_name(out: Path, example: str) -> None:
    if out.name in ("", ".", ".."):
        raise InvalidInput(f"--out {str(out)!r} names an existing folder itself, not a new output; pass a new name, e.g. --out {example}")


def check_writable(folder: Path, out: Path) -> None:
    """Raise unless a file can be created in `folder` (or in its nearest existing parent, which will hold it).

    A probe file is created and removed: `os.access` answers from permission bits only and is wrong for
    root, read-only mounts and ACLs.
    """
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise InvalidInput(f"cannot write {out}: {probe_dir} is a file, not a folder; pass another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=stale.temp_prefix("fsdeploy-write-probe"), suffix=".tmp", dir=probe_dir)
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {probe_dir} is not writable ({exc.strerror}); pass --out in a folder you can write") from None
    os.close(fd)
    os.unlink(probe)


def bundle_summary(folder: Path) -> dict | None:
    """The manifest of an fsdeploy bundle at `folder` as a dict, {} when it has an unreadable manifest, None when it is not one."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return None
    try:
        d = json.loads(mf.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or "schema" not in d or "graphs" not in d:
        return None
    return d


def replacement_losses(manifest: dict) -> str:
    """What replacing a bundle loses, in words: engines, INT8/FP16 graphs, task compatibility (read from the
    manifest's variants, and from the `engines` / `extra["int8"]` of manifests written before them)."""
    if not manifest:
        return "its unreadable manifest and every file in it"
    lost = []
    engines = dict(manifest.get("engines") or {}) if isinstance(manifest.get("engines"), dict) else {}
    variants = manifest.get("variants") if isinstance(manifest.get("variants"), dict) else {}
    engines.update({rel: v for rel, v in variants.items() if isinstance(v, dict) and v.get("kind") == "trt"})
    graphs = [rel for rel, v in variants.items() if isinstance(v, dict) and v.get("kind") == "onnx"]
    if graphs:
        lost.append(f"the {', '.join(sorted({str(variants[r].get('precision')) for r in graphs}))} graph(s) {', '.join(sorted(graphs))}")
    if engines:
        lost.append(f"{len(engines)} TensorRT engine(s) ({', '.join(sorted(engines)[:3])}{' ...' if len(engines) > 3 else ''})")
    extra = manifest.get("extra") or {}
    if isinstance(extra, dict) and extra.get("int8"):
        lost.append(f"the int8 graph {extra['int8'].get('file', '')}".rstrip())
    lost.append("task artefacts adapted on it (they are tied to its graphs' hashes; re-run `fsdeploy adapt`)")
    return ", ".join(lost)


def check_bundle_out(out: str | os.PathLike[str], *, overwrite: bool) -> str | None:
    """Raise unless a bundle may be written at `out`.

    Args:
        out: the bundle folder to write.
        overwrite: an existing bundle may be replaced (`--force`).

    Returns:
        None when `out` is new (or an empty folder); else what replacing the bundle there loses.

    Raises:
        InvalidInput: `out` is `.`/`..`, a symlink, a file, a folder that is not a bundle, a bundle without
            `overwrite`, or not writable.
    """
    out = Path(out)
    _check_name(out, "bundle")
    if out.is_symlink():
        raise InvalidInput(f"--out {out} is a symlink; pass the real folder (fsdeploy does not replace links)")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file, not a bundle folder; pass a new folder name (fsdeploy replaces only bundles)")
    check_writable(out.parent, out)
    if not out.exists():
        return None
    entries = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return None
    manifest = bundle_summary(out)
    if manifest is None:
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise InvalidInput(
            f"--out {out} is a folder that is not an fsdeploy bundle (it holds {shown}); fsdeploy replaces only bundles, "
            "so pass a new folder name"
        )
    losses = replacement_losses(manifest)
    if not overwrite:
        what = f"an fsdeploy bundle of {manifest.get('model', '?')} (adapter {manifest.get('adapter', '?')})" if manifest else "a bundle with an unreadable manifest"
        raise InvalidInput(f"--out {out} already holds {what}; replacing it loses {losses}; pass --force to replace it, or another --out")
    return losses


def is_task_file(path: Path) -> bool:
    """Whether `path` is an fsdeploy task artefact (an .npz with schema and bundle_id), without trusting it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "schema" in z.files and "bundle_id" in z.files
    except Exception:  # noqa: BLE001 - anything unreadable as npz is not ours
        return False


def check_task_out(out: str | os.PathLike[str]) -> None:
    """Raise unless a task artefact may be written at `out` (new, or replacing a task artefact).

    Raises:
        InvalidInput: `out` is `.`/`..`/a folder/a symlink, an existing file that is not a task artefact, or
            in a folder that is not writable.
    """
    out = Path(out)
    _check_name(out, "task.npz")
    if out.is_dir():
        raise InvalidInput(f"--out {out} is a folder; pass a file name for the task artefact, e.g. --out {out / 'task.npz'}")
    if out.is_symlink():
        raise InvalidInput(f"--out {out} is a symlink; pass the real file (fsdeploy does not replace links)")
    if out.exists() and not is_task_file(out):
        raise InvalidInput(f"--out {out} exists and is not an fsdeploy task artefact; fsdeploy replaces only its own tasks, so pass another --out")
    check_writable(out.parent, out)
