"""Atomic artefact writing: write beside the target, then os.replace, so no half-written file is ever seen.

Temp names carry their owner (`.NAME.p<pid>h<host>-XXXX.tmp`), so a later writer in the same folder can
prove a temp left by a killed process is dead (that pid is gone on this host) and remove it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fsdeploy import stale
from fsdeploy.interrupts import deferred, mark_committed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `target`.

    Args:
        target: final file path.
        suffix: extension for the temp file (some writers, e.g. np.savez, insist on one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stale.sweep(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=stale.temp_prefix(target.name), suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts get the usual file mode
    try:
        yield tmp_path
        with deferred():
            os.replace(tmp_path, target)
            mark_committed(target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write bytes to `target`."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Atomically write text (UTF-8) to `target`."""
    write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` as a whole.

    A failure or interrupt inside the block removes the temporary folder and leaves any old `target`
    untouched. The swap itself is one `renameat2(RENAME_EXCHANGE)` where the OS has it, so even SIGKILL leaves
    either the old or the new folder at `target`; elsewhere the old folder is parked under an owner-tagged
    name that `stale.sweep` puts back if the process died between the two renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stale.sweep(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=stale.temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        with deferred():
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise FileExistsError(target)
                if not stale.exchange(tmp, target):
                    parked = target.with_name(stale.temp_prefix(target.name) + stale.PARKED_SUFFIX)
                    os.replace(target, parked)
                    os.replace(tmp, target)
                    tmp = parked
            else:
                os.replace(tmp, target)
            mark_committed(target)
        # after the swap `tmp` holds the old folder (or a removed name): delete it outside the deferred block
        _remove(tmp)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_npz(target: str | os.PathLike[str], arrays: dict[str, object]) -> Path:
    """Atomically write an uncompressed `.npz` of plain arrays (no pickles): the one writer of task files."""
    import numpy as np

    target = Path(target)
    with atomic_path(target, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return target
