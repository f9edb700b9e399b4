"""Which GPUs TensorRT-RTX can build engines for, checked before a build rather than failing inside it.

TensorRT-RTX compiles for the compute capabilities in its `ComputeCapability` enum; its support matrix (TensorRT-RTX
1.5) lists Turing (7.5), Ampere GA10x (8.6), Ada (8.9) and Blackwell (12.0, 12.1): no data-centre Ampere (8.0),
Hopper (9.0) or Blackwell B200 (10.0). NVIDIA's full TensorRT, which does target those, is not installable from
PyPI: its `tensorrt-cu*-libs` wheels are stubs that download the libraries from NVIDIA at install time.
"""
from __future__ import annotations

from fsdeploy.errors import EngineError

RTX_TARGETS: tuple[tuple[int, int], ...] = ((7, 5), (8, 6), (8, 9), (12, 0), (12, 1))
_NAMES = {(8, 0): "A100-class Ampere", (9, 0): "Hopper", (10, 0): "B200-class Blackwell"}


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of CUDA device 0, or None without a visible GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - torch without CUDA, or a broken driver: no GPU to check against
        return None


def check_build_target(backend: str, capability: tuple[int, int] | None = None) -> None:
    """Refuse a TensorRT-RTX build for a GPU it cannot target, saying what to use instead.

    Args:
        backend: `tensorrt_rtx` or `tensorrt` (full TensorRT targets every GPU it supports: not checked).
        capability: the GPU's (major, minor); default: device 0's, if any.

    Raises:
        EngineError: TensorRT-RTX and a GPU outside its targets.
    """
    if backend != "tensorrt_rtx":
        return
    cap = capability if capability is not None else gpu_capability()
    if cap is None or tuple(cap) in RTX_TARGETS:
        return
    kind = _NAMES.get(tuple(cap), "this GPU")
    raise EngineError(
        f"TensorRT-RTX cannot build for {kind} (SM{cap[0]}{cap[1]}): its ComputeCapability targets are "
        f"{', '.join(f'{a}.{b}' for a, b in RTX_TARGETS)}, with no SM{cap[0]}{cap[1]}; full TensorRT is not on PyPI "
        "(its -libs wheels are download stubs): install it from NVIDIA (a TensorRT container or tarball), or serve with "
        "--backend ort after pip install 'fsdeploy[gpu]' (ONNX Runtime CUDA)"
    )
