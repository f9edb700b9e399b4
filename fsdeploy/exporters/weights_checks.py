"""Checks on where a bundle's weights come from, before export: random init, a non-native size, no network.

Each of these used to pass silently and give a bundle that looks fine and classifies at chance: random
weights (no --checkpoint, no --pretrained), a checkpoint exported at another resolution than it was trained
at (BatchNorm statistics no longer match: the shipped 32 px glyph backbone gives features of ~1e6 at 224 px),
or `--pretrained` without network (timm retries the hub for about a minute). Warnings go through
`warnings.warn(FsdeployWarning)`, which the CLI prints as one line; both facts are recorded in the manifest.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fsdeploy.errors import FsdeployError, FsdeployWarning

META_KEY = "fsdeploy"  # as in fsdeploy.backbones
PROBE_TIMEOUT_S = 4.0


def native_size(checkpoint: str | Path | None) -> int | None:
    """The input side a `.safetensors` checkpoint written by fsdeploy was trained at (None if unrecorded)."""
    if checkpoint is None or Path(checkpoint).suffix != ".safetensors" or not Path(checkpoint).is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception:  # noqa: BLE001 - unreadable: create_backbone reports it with the full message
        return None
    size = meta.get("input_size")
    return int(size[-1]) if isinstance(size, list) and size else None


def size_hint(checkpoint: str | Path | None, img_size: int | None) -> str:
    """' (checkpoint ... was trained at N px; try --img-size N)' when img_size is not the native size, else ''."""
    native = native_size(checkpoint)
    if native is None or img_size is None or img_size == native:
        return ""
    return f"; note {checkpoint} was trained at {native} px, not {img_size}: try --img-size {native}"


def warn_weights(model: str, checkpoint: str | Path | None, pretrained: bool, img_size: int | None) -> None:
    """Warn about random weights or a non-native size; fail in seconds when --pretrained has no network.

    Raises:
        FsdeployError: `pretrained` and the weights are neither cached nor reachable.
    """
    if checkpoint is None and not pretrained:
        warnings.warn(
            f"no --checkpoint or --pretrained: {model} gets RANDOM weights, so its features carry no meaning; "
            "recorded in the manifest (source.random_init)", FsdeployWarning, stacklevel=3,
        )
    native = native_size(checkpoint)
    if native is not None and img_size is not None and img_size != native:
        warnings.warn(
            f"{checkpoint} was trained at {native} px but is exported at {img_size} px: its BatchNorm statistics no longer "
            f"match and features may be useless (the shipped glyph backbone is at chance at 224 px); pass --img-size {native} "
            "or drop --img-size", FsdeployWarning, stacklevel=3,
        )
    if pretrained:
        check_hub(model)


def weights_record(checkpoint: str | Path | None, pretrained: bool, preprocess: Any) -> dict[str, Any]:
    """Manifest `source` keys: whether the weights are random, and the checkpoint's native size."""
    native = native_size(checkpoint)
    return {
        "random_init": checkpoint is None and not pretrained,
        "native_img_size": native,
        "exported_img_size": int(preprocess.input_size[-1]),
    }


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (DNS included, which sockets do not time out)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _cached(hf_hub_id: str | None) -> bool:
    if not hf_hub_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(found, str):
            return True
    return False


def check_hub(model: str) -> None:
    """Fail fast when timm's pretrained weights for `model` are not cached and their host cannot be reached.

    Raises:
        FsdeployError: offline (HF_HUB_OFFLINE set, or the host does not answer within a few seconds).
    """
    from fsdeploy.deps import require

    timm = require("timm")
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:  # noqa: BLE001 - unknown model: create_backbone names it
        return
    if cfg is None:
        return
    hub_id = getattr(cfg, "hf_hub_id", None)
    if _cached(hub_id):
        return
    fix = "pass local weights with --checkpoint FILE instead of --pretrained (or copy timm's cache from a machine with network)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FsdeployError(f"--pretrained {model}: HF_HUB_OFFLINE is set and the weights are not in the cache; {fix}")
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}/" if hub_id else (getattr(cfg, "url", "") or "")
    parsed = urlparse(url)
    if not parsed.hostname:
        return
    if not _reachable(parsed.hostname, parsed.port or 443, PROBE_TIMEOUT_S):
        raise FsdeployError(f"--pretrained {model}: {parsed.hostname} is not reachable (no network?) and the weights are not cached; {fix}")
