"""ONNX Runtime's CUDA execution provider: session options, library preloading and device-resident I/O.

- `cudnn_conv_algo_search` HEURISTIC: the default EXHAUSTIVE benchmarks every cuDNN algorithm for each new
  input shape, so every new batch size pays a search of seconds; HEURISTIC asks cuDNN's heuristics instead.
- `onnxruntime.preload_dlls()` (onnxruntime-gpu >= 1.21) loads the CUDA and cuDNN libraries that PyTorch's
  wheels installed (nvidia-*-cu* packages), so onnxruntime-gpu needs no system CUDA; called once, before
  the first CUDA session.
- `CudaIO` runs a session through IOBinding with device buffers: batch inputs are copied to the GPU per
  run, outputs land in GPU memory and are copied back once; inputs without a batch axis (CaSE's γ) stay
  on the device while their values are unchanged, so γ crosses PCIe once per task rather than per query.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CUDA = "CUDAExecutionProvider"
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def provider_list(providers: Sequence[str], device_id: int = 0) -> list[Any]:
    """Providers for `InferenceSession`, the CUDA one with fsdeploy's options."""
    return [(p, {**CUDA_OPTIONS, "device_id": str(device_id)}) if p == CUDA else p for p in providers]


@functools.lru_cache(maxsize=1)
def _preloaded(ort: Any) -> bool:
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # older onnxruntime-gpu: the libraries must be on the loader path already
        return False
    preload()
    return True


def preload_cuda(ort: Any, providers: Sequence[str]) -> bool:
    """Preload CUDA/cuDNN once when a CUDA session is about to be made; True when preload_dlls ran."""
    return CUDA in providers and _preloaded(ort)


class CudaIO:
    """Runs one CUDA session with device buffers (see the module docstring).

    Args:
        ort: the onnxruntime module.
        session: an InferenceSession whose first provider is CUDA.
        batched: names of inputs whose first axis is the batch (copied every run).
        device_id: the GPU.
    """

    def __init__(self, ort: Any, session: Any, batched: set[str], device_id: int = 0) -> None:
        self.ort, self.session, self.batched, self.device_id = ort, session, set(batched), device_id
        self._resident: dict[str, tuple[np.ndarray, Any]] = {}  # name -> (host copy, device OrtValue)
        self.uploads: dict[str, int] = {}  # per input: host-to-device copies made (for tests and profiling)

    def _device_value(self, name: str, arr: np.ndarray) -> Any:
        if name not in self.batched:
            held = self._resident.get(name)
            if held is not None and held[0].shape == arr.shape and np.array_equal(held[0], arr):
                return held[1]
        value = self.ort.OrtValue.ortvalue_from_numpy(arr, "cuda", self.device_id)
        self.uploads[name] = self.uploads.get(name, 0) + 1
        if name not in self.batched:
            self._resident[name] = (arr.copy(), value)
        return value

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, self._device_value(name, arr))
        for name in output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in zip(output_names, binding.get_outputs())}
