"""A per-machine cache of ONNX Runtime's optimised graphs, so bundle sessions start without re-optimising.

Why: a CaSE adaptation opens 21 sessions (20 stages and `case_gamma`), and each one re-runs ONNX Runtime's
graph optimisers (constant folding, fusions, the NCHWc layout pass). Loading the graph ONNX Runtime saved
after optimising, with the optimisers off, halves that: 20 efficientnet_b0 stages at 224 px opened in 0.05-0.11 s
from the bundle and 0.03-0.05 s from the cache, and a 100-image context pass ran 1.77 -> 1.69 s (interleaved
medians of 8, env switch on/off), with bit-identical features.

The saved graph holds choices made for this CPU (the NCHWc block width follows its vector width), so the key
names ONNX Runtime's version, the machine and the CPU's feature flags as well as the source file (resolved path,
size, modification time; bundle files are replaced, never edited, so a re-export gets a new key). A cached
file that fails to load is rebuilt; a cache folder that cannot be written is skipped. `FSDEPLOY_ORT_CACHE=off`
turns the cache off, any other value is the folder to use (default `$XDG_CACHE_HOME/fsdeploy/ort`, else
`~/.cache/fsdeploy/ort`).

Size: each load marks its entry used (modification time), and after each new entry the least recently used
others are deleted until the folder holds at most `FSDEPLOY_ORT_CACHE_MAX_MB` (default 2048 MB; a CaSE
efficientnet_b0 bundle at 224 px takes about 50 MB), so re-exports, re-quantized graphs and old ONNX Runtime
versions do not pile up.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fsdeploy.errors import InvalidInput

ENV = "FSDEPLOY_ORT_CACHE"
MAX_ENV = "FSDEPLOY_ORT_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048
OFF = {"0", "off", "no", "false", "none", ""}


def cache_dir() -> Path | None:
    """The cache folder this process uses, or None when `FSDEPLOY_ORT_CACHE` turns it off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fsdeploy" / "ort"


def cache_limit_bytes() -> int:
    """Most bytes the cache folder keeps (`FSDEPLOY_ORT_CACHE_MAX_MB`, default 2048).

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
    """Machine, processor and (on Linux) the first CPU's feature flags: what the optimised graph depends on."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            parts += [line for line in f if line.startswith(("flags", "Features"))][:1]
    except OSError:
        pass
    return "|".join(parts)


def cache_key(source: Path, ort_version: str) -> str:
    st = source.stat()
    text = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{ort_version}|{cpu_signature()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def open_cached(
    ort: Any, source: Path, make_options: Callable[[bool], Any], providers: Sequence[str], folder: Path
) -> Any:
    """An InferenceSession of `source` through the cache in `folder`.

    `make_options(optimise)` returns fresh SessionOptions: with every optimiser on (to build and save the
    cached graph) or all off (to load a graph that is already optimised).
    """
    limit = cache_limit_bytes()
    target = folder / f"{source.stem}-{cache_key(source, ort.__version__)}.onnx"
    if target.is_file():
        try:
            session = ort.InferenceSession(str(target), sess_options=make_options(False), providers=list(providers))
        except Exception:  # noqa: BLE001 - ORT raises its own types (InvalidProtobuf, Fail, ...); rebuild below
            _remove(target)
        else:
            with contextlib.suppress(OSError):
                os.utime(target)  # marks it used: eviction removes the least recently used first
            return session
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        so = make_options(True)
        so.optimized_model_filepath = str(tmp)
        session = ort.InferenceSession(str(source), sess_options=so, providers=list(providers))
        os.replace(tmp, target)
        evict(folder, limit, keep=target)
        return session
    except Exception:  # noqa: BLE001 - cannot write the cache; a bad graph fails again below with its own message
        _remove(tmp)
    return ort.InferenceSession(str(source), sess_options=make_options(True), providers=list(providers))


def evict(folder: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used cached graphs (oldest modification time first, never `keep`) until
    the folder's graphs take at most `limit` bytes; returns what was deleted."""
    entries = []
    for path in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):
            st = path.stat()
            entries.append((st.st_mtime_ns, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path == keep:
            continue
        _remove(path)
        total -= size
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
