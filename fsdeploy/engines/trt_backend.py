"""Which TensorRT this machine has: NVIDIA TensorRT (10.x on Jetson, 11.x on x86) or TensorRT-RTX.

Both are driven through Polygraphy, which reads `POLYGRAPHY_USE_TENSORRT_RTX` when its modules are first
imported and binds each of them to one TensorRT flavour for the life of the process. So the choice is made
here, before any Polygraphy import, and every fsdeploy module that needs Polygraphy or TensorRT gets them
through `load_backend()`.

Order: `FSDEPLOY_TRT_BACKEND` (`tensorrt` | `tensorrt_rtx`) when set; otherwise `tensorrt` when importable;
otherwise `tensorrt_rtx`. TensorRT-RTX builds engines ahead of time on the CPU (no GPU needed to build;
engines run on Ampere and newer by default), so CI can build every graph without a GPU.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fsdeploy.deps import available
from fsdeploy.errors import EngineError, MissingDependency

BACKENDS = ("tensorrt", "tensorrt_rtx")
ENV_CHOICE = "FSDEPLOY_TRT_BACKEND"
_POLYGRAPHY_RTX_ENV = "POLYGRAPHY_USE_TENSORRT_RTX"


@dataclass(frozen=True)
class TrtBackend:
    """An imported TensorRT flavour and what its API offers."""

    name: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    trt: ModuleType

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def tag(self) -> str:
        """Short name for engine file names: `trt10.3`, `trtrtx1.7`."""
        major_minor = ".".join(self.version.split(".")[:2])
        return f"{'trtrtx' if self.is_rtx else 'trt'}{major_minor}"

    @property
    def strongly_typed(self) -> bool:
        """Networks can be strongly typed: layer types follow the ONNX graph's tensor types exactly."""
        return hasattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")

    @property
    def has_fp16_flag(self) -> bool:
        """The builder still has a FP16 flag (TensorRT <= 10; removed in 11 and absent in RTX)."""
        return hasattr(self.trt.BuilderFlag, "FP16")

    @property
    def builds_on_cpu(self) -> bool:
        """TensorRT-RTX compiles ahead of time without a GPU; NVIDIA TensorRT needs one to build."""
        return self.is_rtx

    @property
    def timing_cache(self) -> bool:
        """A tactic timing cache speeds up rebuilds. TensorRT-RTX ignores it and, per its docs, a timing cache
        makes its ahead-of-time build query for a GPU, so it is only used with NVIDIA TensorRT."""
        return not self.is_rtx and hasattr(self.trt.IBuilderConfig, "create_timing_cache")

    def info(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    def polygraphy(self) -> ModuleType:
        """`polygraphy.backend.trt`, bound to this flavour."""
        return importlib.import_module("polygraphy.backend.trt")

    def create_config(self, **kwargs: Any) -> Any:
        """Polygraphy's builder-config loader for this flavour (`CreateConfigRTX` for TensorRT-RTX)."""
        if self.is_rtx:
            from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

            return CreateConfigRTX(**kwargs)
        return self.polygraphy().CreateConfig(**kwargs)


def _choose(prefer: str | None) -> str:
    choice = prefer or os.environ.get(ENV_CHOICE) or None
    if choice is not None:
        if choice not in BACKENDS:
            raise EngineError(f"{ENV_CHOICE}={choice!r} is not a TensorRT backend; use one of {', '.join(BACKENDS)}")
        return choice
    if os.environ.get(_POLYGRAPHY_RTX_ENV, "0") != "0" and available("tensorrt_rtx"):
        return "tensorrt_rtx"
    if available("tensorrt"):
        return "tensorrt"
    if available("tensorrt_rtx"):
        return "tensorrt_rtx"
    raise MissingDependency(
        "neither tensorrt nor tensorrt_rtx is installed; run: pip install fsdeploy[tensorrt] "
        "(TensorRT-RTX, builds engines without a GPU) or install NVIDIA TensorRT (JetPack ships it on Jetson)"
    )


def _bind_polygraphy(rtx: bool) -> None:
    """Point Polygraphy at the chosen flavour, or refuse when it is already bound to the other one."""
    if not available("polygraphy"):
        raise MissingDependency("polygraphy is not installed; run: pip install fsdeploy[tensorrt]")
    if "polygraphy.backend.trt" in sys.modules:
        import polygraphy.config as pconfig

        if bool(pconfig.USE_TENSORRT_RTX) != rtx:
            raise EngineError(
                f"polygraphy was imported for {'TensorRT-RTX' if pconfig.USE_TENSORRT_RTX else 'TensorRT'} before fsdeploy "
                f"chose {'TensorRT-RTX' if rtx else 'TensorRT'}; set {ENV_CHOICE} (or {_POLYGRAPHY_RTX_ENV}) before starting"
            )
        return
    os.environ[_POLYGRAPHY_RTX_ENV] = "1" if rtx else "0"
    if "polygraphy.config" in sys.modules:  # config read before the env var was set: update it in place
        import polygraphy.config as pconfig

        pconfig.USE_TENSORRT_RTX = rtx


def load_backend(prefer: str | None = None) -> TrtBackend:
    """Import the TensorRT flavour to use and bind Polygraphy to it.

    Args:
        prefer: `tensorrt` or `tensorrt_rtx` to force one (default: `FSDEPLOY_TRT_BACKEND`, then auto).

    Raises:
        MissingDependency: neither flavour (or Polygraphy) is installed.
        EngineError: Polygraphy was already bound to the other flavour in this process.
    """
    name = _choose(prefer)
    _bind_polygraphy(name == "tensorrt_rtx")
    try:
        trt = importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependency(f"{name} cannot be imported ({exc}); run: pip install fsdeploy[tensorrt]") from exc
    return TrtBackend(name, str(trt.__version__), trt)


def gpu_present() -> bool:
    """True when a CUDA device is visible (engines can be deserialized, inspected and run)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch without CUDA support, or a broken driver: treat as no GPU
        return False


def deserialize(engine_bytes: bytes, backend: TrtBackend | None = None, *, what: str = "engine") -> Any:
    """An ICudaEngine from serialized bytes (needs a GPU).

    Raises:
        EngineError: no GPU, or the bytes are not an engine for this TensorRT (corrupt or foreign).
    """
    backend = backend or load_backend()
    if not gpu_present():
        raise EngineError(f"opening {what} needs a CUDA GPU and none is visible; run it on the device (or use the 'ort' backend here)")
    from polygraphy.backend.trt import util as trt_util

    runtime = backend.trt.Runtime(trt_util.get_trt_logger())
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EngineError(
            f"{what} is not a valid {backend.name} {backend.version} engine (corrupt, or built by another TensorRT "
            "or for another GPU); rebuild it with `fsdeploy build`"
        )
    return engine
