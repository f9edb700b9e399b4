"""What every per-machine engine cache shares: the CPU it was built for, its size limit and LRU eviction.

ONNX Runtime's optimised graphs (`fsdeploy.engines.ort_cache`, one `.onnx` file per entry) and OpenVINO's
compiled models (`fsdeploy.engines.openvino`, one folder of blobs per source graph) follow the same rules:
an entry is marked used (modification time) whenever it is loaded, and after each new entry the least
recently used others are deleted until the folder holds at most `FSDEPLOY_ORT_CACHE_MAX_MB` (default
2048 MB; the limit applies to each cache folder on its own).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
from pathlib import Path

from fsdeploy.errors import InvalidInput

MAX_ENV = "FSDEPLOY_ORT_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048


def cache_limit_bytes() -> int:
    """Most bytes one cache folder keeps (`FSDEPLOY_ORT_CACHE_MAX_MB`, default 2048).

    Raises:
        InvalidInput: the variable is not a non-negative number of megabytes.
    """
    value = os.environ.get(MAX_ENV, "").strip() or str(DEFAULT_MAX_MB)
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise InvalidInput(f"{MAX_ENV}={value!r} is not a size in MB; set it to e.g. 2048 (or unset it for the default)")
    return int(mb * 2**20)


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """Machine, processor and (on Linux) the first CPU's feature flags: what a compiled graph depends on."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            parts += [line for line in f if line.startswith(("flags", "Features"))][:1]
    except OSError:
        pass
    return "|".join(parts)


def entry_bytes(path: Path) -> int:
    """Bytes an entry takes: a file's size, or the sum over a folder's files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def mark_used(path: Path) -> None:
    """Set the entry's modification time to now: eviction removes the least recently used first."""
    with contextlib.suppress(OSError):
        os.utime(path)


def evict_entries(folder: Path, limit: int, *, pattern: str, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries matching `pattern` (oldest modification time first, never
    `keep`) until they take at most `limit` bytes; returns what was deleted."""
    entries = []
    for path in folder.glob(pattern):
        with contextlib.suppress(OSError):
            entries.append((path.stat().st_mtime_ns, entry_bytes(path), path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path == keep:
            continue
        remove_entry(path)
        total -= size
        removed.append(path)
    return removed


def remove_entry(path: Path) -> None:
    """Delete a cached file or folder; a missing or busy one is left to the next eviction."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
