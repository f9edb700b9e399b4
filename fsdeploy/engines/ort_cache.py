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

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fsdeploy.engines.cache_files import (  # noqa: F401 - re-exported: the ORT cache's settings
    DEFAULT_MAX_MB, MAX_ENV, cache_limit_bytes, cpu_signature, evict_entries, mark_used, remove_entry,
)

ENV = "FSDEPLOY_ORT_CACHE"
OFF = {"0", "off", "no", "false", "none", ""}


def cache_dir() -> Path | None:
    """The cache folder this process uses, or None when `FSDEPLOY_ORT_CACHE` turns it off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fsdeploy" / "ort"


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
            mark_used(target)
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
    return evict_entries(folder, limit, pattern="*.onnx", keep=keep)


def _remove(path: Path) -> None:
    remove_entry(path)
