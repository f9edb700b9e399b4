"""Engines: one interface (`Engine.run(feeds) -> outputs`) over ONNX Runtime, PyTorch and TensorRT.

`open_engine(bundle, graph, backend)` is the one place that maps a backend name to its class.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdeploy.engines.base import Engine, TensorSpec
from fsdeploy.errors import RegistryError, UnknownName

__all__ = ["ENGINES", "Engine", "EngineOptions", "TensorSpec", "open_engine", "register_engine"]


@dataclass(frozen=True)
class EngineOptions:
    """Backend-neutral settings; each backend reads the fields it understands."""

    threads: int | None = None
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers
    precision: str = "fp32"  # trt: which engine to pick; ort: fp32, or int8 (the graph from `fsdeploy quantize`)
    device: str | None = None  # torch device
    # When ONNX Runtime's workers busy-wait (OrtOptions.spinning: off | run | always). None: "always" for
    # graphs that run back to back and are closed right after (the CaSE stage chain), "run" otherwise.
    # Measured: a session left spinning between runs slows the next 100 ms of other work on a 2-core
    # machine 1.4-3x, so no other session spins once its run has returned.
    spinning: str | None = None
    cpu_arena: bool = True  # ONNX Runtime's CPU memory arena: keeps peak buffers of a session for reuse
    # OpenVINO's PERFORMANCE_HINT: latency | throughput (`fsdeploy.engines.openvino.hint_for_batch`); None: latency
    hint: str | None = None


Opener = Callable[[Any, str, EngineOptions], Engine]
ENGINES: dict[str, Opener] = {}


def register_engine(name: str) -> Callable[[Opener], Opener]:
    """Decorator adding a backend opener `(bundle, graph_name, options) -> Engine`."""

    def add(fn: Opener) -> Opener:
        if name in ENGINES:
            raise RegistryError(f"engine backend {name!r} registered twice")
        ENGINES[name] = fn
        return fn

    return add


@register_engine("ort")
def _open_ort(bundle: Any, graph: str, options: EngineOptions) -> Engine:
    from fsdeploy.engines.ort import OrtEngine, OrtOptions
    from fsdeploy.engines.ort_cache import cache_dir

    ort_options = OrtOptions(
        providers=options.providers, threads=options.threads, spinning=options.spinning or "run",
        cpu_arena=options.cpu_arena, cache_dir=cache_dir(),
    )
    return OrtEngine(_ort_graph_file(bundle, graph, options.precision), ort_options)


def _ort_graph_file(bundle: Any, graph: str, precision: str) -> Path:
    """The FP32 graph, or its INT8 version (kept outside `manifest.graphs` so the bundle id stays)."""
    if precision == "fp32":
        return bundle.graph_path(graph)
    if precision == "int8":
        from fsdeploy.exporters.quantize import int8_graph_path

        return int8_graph_path(bundle, graph)
    raise UnknownName(f"ONNX Runtime runs precision fp32, or int8 after `fsdeploy quantize`; got {precision!r} (fp16 engines run on --backend trt)")


@register_engine("torch")
def _open_torch(bundle: Any, graph: str, options: EngineOptions) -> Engine:
    from fsdeploy.engines.torch_engine import TorchEngine
    from fsdeploy.exporters.rebuild import torch_graphs

    if options.precision != "fp32":
        raise UnknownName(
            f"the torch backend runs the bundle's reference module in fp32; got --precision {options.precision} "
            "(fp16 runs on --backend trt, int8 on --backend ort after `fsdeploy quantize`)"
        )
    g = torch_graphs(bundle)[graph]
    info = bundle.manifest.graphs[graph]
    # positional order comes from the export spec: the manifest's JSON keeps its keys sorted
    inputs = {name: info.inputs[name] for name in g.spec.inputs}
    return TorchEngine(g.module, inputs, tuple(g.spec.outputs), device=options.device, threads=options.threads)


def _load_optional_backends() -> None:
    import importlib

    try:
        importlib.import_module("fsdeploy.engines.trt")
    except ModuleNotFoundError as exc:
        if exc.name != "fsdeploy.engines.trt":
            raise


def open_engine(bundle: Any, graph: str, backend: str = "ort", options: EngineOptions | None = None) -> Engine:
    """Open one graph of a loaded bundle on `backend` ('ort', 'torch', 'trt')."""
    if backend not in ENGINES:
        _load_optional_backends()
    if backend not in ENGINES:
        raise UnknownName(f"unknown engine backend {backend!r}; known: {', '.join(sorted(ENGINES))}")
    bundle.graph_path(graph)  # raises a clear error for an unknown graph name
    return ENGINES[backend](bundle, graph, options or EngineOptions())
