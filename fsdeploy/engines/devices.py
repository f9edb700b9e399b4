"""`--device`: one backend-neutral device name, mapped to what each engine backend calls it.

`cpu`; `cuda` or `cuda:N` (an NVIDIA GPU: ONNX Runtime's CUDA execution provider, PyTorch's cuda:N,
TensorRT); `gpu` or `gpu:N` (an Intel GPU through OpenVINO's GPU plugin). None keeps each backend's own
default (ONNX Runtime: CUDA when onnxruntime-gpu is installed, else CPU; torch: cuda when available).
"""
from __future__ import annotations

from fsdeploy.errors import InvalidInput

KINDS = ("cpu", "cuda", "gpu")
# backend -> device kinds it runs on
RUNS_ON = {"ort": ("cpu", "cuda"), "torch": ("cpu", "cuda"), "openvino": ("cpu", "gpu"), "trt": ("cuda",)}
HELP = ("Device for the engine: cpu, cuda or cuda:N (NVIDIA GPU: ONNX Runtime CUDA provider, torch, trt), gpu or gpu:N "
        "(Intel GPU, --backend openvino). Default: the backend's own (ort: CUDA when onnxruntime-gpu is installed, else CPU).")


def parse_device(device: str) -> tuple[str, int | None]:
    """`cuda:1` -> ("cuda", 1); `cpu` -> ("cpu", None).

    Raises:
        InvalidInput: not one of cpu, cuda[:N], gpu[:N].
    """
    kind, sep, index = device.strip().lower().partition(":")
    if kind not in KINDS or (sep and not index.isdigit()) or (kind == "cpu" and sep):
        raise InvalidInput(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or gpu[:N] (OpenVINO)")
    return kind, int(index) if sep else None


def check_device(backend: str, device: str | None) -> None:
    """Refuse a device the backend cannot use, or one this machine lacks, with the fix.

    Raises:
        InvalidInput: e.g. --device cuda with a CPU-only onnxruntime, or --device cpu with trt.
    """
    if device is None:
        return
    kind, _ = parse_device(device)
    kinds = RUNS_ON.get(backend)
    if kinds is not None and kind not in kinds:
        raise InvalidInput(f"--backend {backend} runs on --device {' or '.join(kinds)}; got --device {device}")
    if backend == "ort" and kind == "cuda":
        from fsdeploy.deps import require

        if "CUDAExecutionProvider" not in require("onnxruntime").get_available_providers():
            raise InvalidInput(f"--device {device}: this onnxruntime has no CUDA execution provider; "
                               "pip install onnxruntime-gpu, or use --device cpu")
    if backend == "torch" and kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidInput(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")


def ort_providers(device: str | None) -> tuple[tuple[str, ...] | None, int]:
    """ONNX Runtime execution providers and CUDA device id for `device` (None: ORT's default)."""
    if device is None:
        return None, 0
    kind, index = parse_device(device)
    if kind == "cuda":
        return ("CUDAExecutionProvider", "CPUExecutionProvider"), index or 0
    return ("CPUExecutionProvider",), 0


def openvino_device(device: str | None) -> str:
    """OpenVINO's device name: CPU, GPU or GPU.N."""
    if device is None:
        return "CPU"
    kind, index = parse_device(device)
    if kind == "cuda":
        raise InvalidInput(f"--backend openvino runs on --device cpu or gpu[:N] (Intel GPU); got --device {device}")
    return "CPU" if kind == "cpu" else "GPU" if index is None else f"GPU.{index}"
