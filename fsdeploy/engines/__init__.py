"""Engines: one interface (`Engine.run(feeds) -> outputs`) over ONNX Runtime, PyTorch and TensorRT.

An engine opens a *source* (`fsdeploy.bundle.GraphSource`: an ONNX file or bytes, TensorRT plans, a torch
module), never a bundle: `open_engine(source, backend, options)`. Each backend registers one `Backend`
record saying what it consumes and which precisions it runs; `fsdeploy.runtime.open_graph(bundle, graph,
backend)` is the convenience that resolves a bundle graph for that backend first.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fsdeploy.bundle.manifest import TensorSpec
from fsdeploy.bundle.sources import GraphSource
from fsdeploy.engines.base import Engine
from fsdeploy.errors import InvalidInput, UnknownName
from fsdeploy.registry import Registry, import_package_modules

__all__ = ["BACKENDS", "Backend", "Engine", "EngineOptions", "TensorSpec", "backend_info", "open_engine", "register_backend"]


@dataclass(frozen=True)
class EngineOptions:
    """Backend-neutral settings; each backend reads the fields it understands."""

    threads: int | None = None
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers
    precision: str = "fp32"  # which variant of a graph to run (fp32, int8 after `fsdeploy quantize`, fp16 on trt)
    device: str | None = None  # cpu | cuda[:N] | gpu[:N] (OpenVINO), mapped per backend by fsdeploy.engines.devices
    # When ONNX Runtime's workers busy-wait (OrtOptions.spinning: off | run | always). None: "always" for
    # graphs that run back to back and are closed right after (the CaSE stage chain), "run" otherwise.
    # Measured: a session left spinning between runs slows the next 100 ms of other work on a 2-core
    # machine 1.4-3x, so no other session spins once its run has returned.
    spinning: str | None = None
    cpu_arena: bool = True  # ONNX Runtime's CPU memory arena: keeps peak buffers of a session for reuse
    batch: int | None = None  # TensorRT: pick an engine whose profile holds this batch
    # OpenVINO's PERFORMANCE_HINT: latency | throughput (`fsdeploy.engines.openvino.hint_for_batch`); None: latency
    hint: str | None = None
    # Inputs and outputs whose dtype and layout callers rely on; None: all of them. The others only pass between
    # graphs of one chain opened with the same options (the CaSE stage state), so an engine may keep them in its
    # own compute precision and layout (OpenVINO at bf16: bf16; `fsdeploy.engines.openvino`). Callers treat
    # such tensors as opaque: they allocate them from `output_specs()` and feed them to the next graph unchanged.
    public_io: tuple[str, ...] | None = None
    # The model's input image height, for graphs that do not take the images (CaSE stages k >= 1): rules
    # relative to it (OpenVINO bf16-mixed keeps layers at >= 1/8 of it f32) then mark what the full graph marks.
    image_height: int | None = None
    # A batch size the caller will run again and again (a warm session's support-set size): OpenVINO also
    # compiles the graph for exactly that batch and runs it whenever a batch has that size (static shapes skip
    # the dynamic-shape bookkeeping: 7% faster on the CaSE context graph, 100 images at 224 px); other sizes
    # run the dynamic graph. Costs a second compile when the engine opens. Other backends ignore it.
    static_batch: int | None = None


Opener = Callable[[GraphSource, EngineOptions], Engine]


@dataclass(frozen=True)
class Backend:
    """One engine backend: what it opens (`kind` of `GraphSource`), at which precisions, and how."""

    name: str
    kind: str  # "onnx" | "trt" | "torch"
    precisions: tuple[str, ...]
    open: Opener
    summary: str = ""
    where: str = ""  # how to get it, for errors and `--help` (an extra to install, a GPU)
    # run precision -> the precision of the graph variant it opens (OpenVINO runs bf16 from the FP32 graph);
    # precisions not listed open their own variant (int8: the QDQ graph, fp16: the FP16 transform or plans)
    reads: dict[str, str] = field(default_factory=dict)

    def source_precision(self, precision: str) -> str:
        return self.reads.get(precision, precision)


def _load_backends() -> None:
    # every module of the package: a backend whose optional package (tensorrt, polygraphy, ...) is missing
    # is left out, and opening it names the extra to install
    import_package_modules("fsdeploy.engines", skip=("build",), optional=True)


BACKENDS: Registry[Backend] = Registry("engine backend", _load_backends)


def register_backend(name: str, kind: str, precisions: tuple[str, ...], *, summary: str = "", where: str = "",
                     reads: dict[str, str] | None = None) -> Callable[[Opener], Opener]:
    """Decorator adding a backend opener `(source, options) -> Engine`."""

    def add(fn: Opener) -> Opener:
        BACKENDS.add(name, Backend(name, kind, precisions, fn, summary, where, dict(reads or {})))
        return fn

    return add


def backend_info(name: str) -> Backend:
    """The registered backend `name` (UnknownName lists the others)."""
    return BACKENDS.get(name)


def check_precision(backend: Backend, precision: str) -> None:
    """Refuse a precision the backend does not run, saying where it runs.

    Raises:
        UnknownName: `precision` is not among the backend's.
    """
    if precision in backend.precisions:
        return
    elsewhere = [b.name for b in BACKENDS.values() if b is not backend and precision in b.precisions]
    where = f"; {precision} engines run on --backend {', '.join(elsewhere)}" if elsewhere else ""
    after = ", after `fsdeploy quantize`" if precision == "int8" and elsewhere else ""
    raise UnknownName(f"the {backend.name} backend runs precision {', '.join(backend.precisions)}; got --precision {precision}{where}{after}")


def open_engine(source: GraphSource | str | Path | bytes, backend: str = "ort", options: EngineOptions | None = None) -> Engine:
    """Open `source` (a GraphSource, an ONNX path or ONNX bytes) on `backend` ('ort', 'torch', 'trt', ...).

    Raises:
        UnknownName: an unknown backend or a precision it does not run.
        InvalidInput: a source of a kind the backend does not open.
    """
    info = BACKENDS.get(backend)
    src = GraphSource.of(source)
    options = options or EngineOptions()
    check_precision(info, options.precision)
    if src.kind != info.kind:
        raise InvalidInput(f"the {backend} backend opens {info.kind} sources; {src.describe()} is a {src.kind} source")
    return info.open(src, options)
