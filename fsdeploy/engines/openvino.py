"""OpenVINO backend (CPU plugin): reads a bundle's ONNX graphs directly; FP32, bf16 and INT8 from QDQ graphs.

Precisions, set through the CPU plugin's INFERENCE_PRECISION_HINT:
- `fp32`: f32 everywhere (matches ONNX Runtime FP32 to float rounding).
- `bf16`: bf16 matmuls and convolutions (f32 accumulation); needs a CPU whose OPTIMIZATION_CAPABILITIES list
  BF16 (AVX512-BF16 or AMX). It is the plugin's own default on such CPUs.
- `default`: whatever the plugin picks on this CPU (bf16 where listed above, else f32).
- `int8`: the QDQ graph from `fsdeploy quantize`; OpenVINO's low-precision transformations turn the
  Quantize/Dequantize pairs into integer kernels; the ops left outside them run in f32.

PERFORMANCE_HINT: LATENCY (one stream with every thread; for batch 1) or THROUGHPUT (several streams of
fewer threads; a batch is split across the plugin's optimal number of infer requests, run at once, so a
batched call uses every stream). `hint_for_batch` gives the usual choice.

Compiled models are cached beside ONNX Runtime's optimised graphs (`cache_dir`), one folder per source graph,
with the same key parts (path, size, modification time or the bytes' hash; OpenVINO's version; the CPU's
flags) and the same LRU size rule (`fsdeploy.engines.cache_files`). OpenVINO 2026.4's CPU blob serves
every precision and hint (its caching properties list none of them; the plugin applies them at import:
a bf16-then-f32 load of one blob gives f32 kernels and f32 results), so an entry holds one blob per graph.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.deps import require
from fsdeploy.bundle.manifest import TensorSpec
from fsdeploy.bundle.sources import GraphSource
from fsdeploy.engines import EngineOptions, register_backend
from fsdeploy.engines.base import Engine
from fsdeploy.engines.cache_files import cache_limit_bytes, cpu_signature, evict_entries, mark_used, remove_entry
from fsdeploy.errors import EngineError, UnknownName

PRECISIONS = ("fp32", "bf16", "int8", "default")
HINTS = ("latency", "throughput")
ENV = "FSDEPLOY_OPENVINO_CACHE"
OFF = {"0", "off", "no", "false", "none", ""}
_INFERENCE_TYPE = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}  # precision -> INFERENCE_PRECISION_HINT


def hint_for_batch(batch: int) -> str:
    """LATENCY for single images, THROUGHPUT for batches."""
    return "latency" if batch <= 1 else "throughput"


def cache_dir() -> Path | None:
    """Where compiled models are cached, or None when off.

    `FSDEPLOY_OPENVINO_CACHE` names the folder (or `off`). Unset: beside ONNX Runtime's cache, i.e.
    `<cache>/fsdeploy/openvino` by default, `<FSDEPLOY_ORT_CACHE>/openvino` when that names a folder, and
    off when `FSDEPLOY_ORT_CACHE=off` (one switch turns both caches off).
    """
    from fsdeploy.engines import ort_cache

    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    ort_folder = ort_cache.cache_dir()
    if ort_folder is None:
        return None
    return ort_folder / "openvino" if os.environ.get(ort_cache.ENV) is not None else ort_folder.parent / "openvino"


@dataclass(frozen=True)
class OpenVinoOptions:
    """Compile settings. `threads=None` uses `FSDEPLOY_THREADS`, else the plugin's default (all cores)."""

    precision: str = "fp32"  # fp32 | bf16 | int8 | default (see the module docstring)
    threads: int | None = None
    hint: str = "latency"  # latency | throughput
    cache_dir: Path | None = None  # None: compile at every open
    device: str = "CPU"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UnknownName(f"OpenVINO runs precision {', '.join(PRECISIONS)}; got {self.precision!r} (fp16 runs on --backend trt)")
        if self.hint not in HINTS:
            raise UnknownName(f"OpenVINO performance hint must be latency or throughput; got {self.hint!r}")


def compile_config(options: OpenVinoOptions, capabilities: list[str]) -> dict[str, Any]:
    """The plugin properties for `options` on a device with `capabilities` (OPTIMIZATION_CAPABILITIES).

    Raises:
        UnknownName: bf16 on a CPU without BF16 support.
    """
    config: dict[str, Any] = {"PERFORMANCE_HINT": options.hint.upper()}
    threads = options.threads or int(os.environ.get("FSDEPLOY_THREADS", "0")) or 0
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if options.precision == "bf16" and "BF16" not in capabilities:
        raise UnknownName(
            f"this {options.device} has no bf16 support (OpenVINO lists {', '.join(capabilities)}); "
            "use --precision fp32 or int8 (bf16 needs AVX512-BF16 or AMX)"
        )
    if options.precision in _INFERENCE_TYPE:
        config["INFERENCE_PRECISION_HINT"] = _INFERENCE_TYPE[options.precision]
    return config


def _cache_entry(root: Path, model: Path | bytes, version: str) -> Path:
    """The folder holding one source graph's compiled blobs."""
    if isinstance(model, bytes):
        stem, source = "graph", hashlib.sha256(model).hexdigest()
    else:
        st = model.stat()
        stem, source = model.stem, f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(f"{source}|{version}|{cpu_signature()}".encode()).hexdigest()[:20]
    return root / f"{stem}-{key}"


def _spec(port: Any) -> TensorSpec:
    # OpenVINO keeps no names for dynamic dims; the first one is the batch in every fsdeploy graph
    shape = tuple(d.get_length() if d.is_static else "batch" if i == 0 else f"d{i}" for i, d in enumerate(port.get_partial_shape()))
    return TensorSpec(shape, str(np.dtype(port.get_element_type().to_dtype())))


class OpenVinoEngine(Engine):
    """An OpenVINO CompiledModel behind the Engine interface.

    Args:
        model: an ONNX graph file, or its bytes (a task's folded graph).
        options: precision, threads, hint, cache folder.

    Raises:
        MissingDependency: openvino is not installed.
        UnknownName: a precision or hint the plugin cannot run here.
        EngineError: the graph does not compile.
    """

    def __init__(self, model: str | Path | bytes, options: OpenVinoOptions | None = None) -> None:
        ov = require("openvino")
        self.options = options = options or OpenVinoOptions()
        core = ov.Core()
        config = compile_config(options, list(core.get_property(options.device, "OPTIMIZATION_CAPABILITIES")))
        source = model if isinstance(model, bytes) else Path(model)
        self.compiled = self._compile(core, source, config)
        label = "in-memory graph" if isinstance(model, bytes) else Path(model).name
        self.name = f"openvino[{options.device} {options.precision} {options.hint}]:{label}"
        self._in_ports = {p.get_any_name(): p for p in self.compiled.inputs}
        self._out_ports = {p.get_any_name(): p for p in self.compiled.outputs}
        self._inputs = {n: _spec(p) for n, p in self._in_ports.items()}
        self._outputs = {n: _spec(p) for n, p in self._out_ports.items()}
        # inputs whose first axis is dynamic are the batch (images, CaSE stage state); the others (γ) are shared
        self._batched = {n for n, s in self._inputs.items() if s.shape and not isinstance(s.shape[0], int)}
        n_requests = 1
        if options.hint == "throughput":
            n_requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._n_requests = n_requests
        self._pools: dict[frozenset[str], list[Any]] = {}

    def _compile(self, core: Any, source: Path | bytes, config: dict[str, Any]) -> Any:
        ov = require("openvino")
        read = (lambda: core.read_model(source)) if isinstance(source, bytes) else (lambda: str(source))
        root = self.options.cache_dir
        try:
            if root is None:
                return core.compile_model(read(), self.options.device, config)
            entry = _cache_entry(root, source, ov.__version__)
            before = set(entry.glob("*")) if entry.is_dir() else None
            try:
                entry.mkdir(parents=True, exist_ok=True)
                compiled = core.compile_model(read(), self.options.device, {**config, "CACHE_DIR": str(entry)})
            except OSError:  # cache folder not writable: compile without it
                return core.compile_model(read(), self.options.device, config)
            except RuntimeError:  # a corrupt blob, or a bad graph: retry once without the entry
                remove_entry(entry)
                return core.compile_model(read(), self.options.device, config)
            mark_used(entry)
            if before is None or set(entry.glob("*")) != before:  # a new blob: keep the folder under its limit
                evict_entries(root, cache_limit_bytes(), pattern="*-*", keep=entry)
            return compiled
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO cannot compile {source if isinstance(source, Path) else 'the in-memory graph'}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; re-export the bundle") from None

    def kernel_precisions(self) -> dict[str, int]:
        """How many convolution / matmul kernels run at each precision, e.g. {"Convolution u8": 20}: what
        the plugin really chose (the hint is a request; ops outside QDQ pairs or unsupported types stay f32)."""
        counts: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
            if kind in ("Convolution", "FullyConnected", "MatMul", "Deconvolution"):
                key = f"{kind} {info['runtimePrecision'].astype(str) if 'runtimePrecision' in info else '?'}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def input_specs(self) -> dict[str, TensorSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, TensorSpec]:
        return dict(self._outputs)

    def _requests(self, key: frozenset[str]) -> list[Any]:
        """One pool of infer requests per set of caller-bound outputs: a request that once wrote into a
        caller's buffer keeps it, so runs binding other outputs (or none) must not reuse that request."""
        if key not in self._pools:
            self._pools[key] = [self.compiled.create_infer_request() for _ in range(self._n_requests)]
        return self._pools[key]

    def _parts(self, feeds: Mapping[str, np.ndarray]) -> list[tuple[int, int]]:
        """Row ranges of the batch, one per request (one range under LATENCY or for small batches)."""
        batch = next((feeds[n].shape[0] for n in self._batched), 1)
        k = min(self._n_requests, batch)
        edges = np.linspace(0, batch, k + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def _slice(self, feeds: Mapping[str, np.ndarray], start: int, stop: int, whole: bool) -> dict[str, np.ndarray]:
        return {n: a if whole or n not in self._batched else a[start:stop] for n, a in feeds.items()}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = self._parts(feeds)
        requests = self._requests(frozenset())
        try:
            if len(parts) == 1:
                res = requests[0].infer(feeds, share_inputs=True, share_outputs=False)
                return {n: res[p] for n, p in self._out_ports.items()}
            for req, (a, b) in zip(requests, parts):
                req.start_async(self._slice(feeds, a, b, False), share_inputs=True)
            for req in requests[: len(parts)]:
                req.wait()
            return {n: np.concatenate([req.get_tensor(p).data for req in requests[: len(parts)]]) for n, p in self._out_ports.items()}
        except RuntimeError as exc:
            raise EngineError(f"{self.name}: {str(exc).splitlines()[0]}") from None

    def _run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """The plugin writes straight into the caller's buffers (tensors sharing their memory); an output
        the plugin had to reallocate is copied."""
        ov = require("openvino")
        parts = self._parts(feeds)
        requests = self._requests(frozenset(outputs))
        whole = len(parts) == 1
        try:
            for req, (a, b) in zip(requests, parts):
                for name, arr in outputs.items():
                    req.set_tensor(self._out_ports[name], ov.Tensor(arr if whole else arr[a:b], shared_memory=True))
                req.start_async(self._slice(feeds, a, b, whole), share_inputs=True)
            for req in requests[: len(parts)]:
                req.wait()
        except RuntimeError as exc:
            raise EngineError(f"{self.name}: {str(exc).splitlines()[0]}") from None
        for req, (a, b) in zip(requests, parts):
            for name, arr in outputs.items():
                got = req.get_tensor(self._out_ports[name]).data
                dst = arr if whole else arr[a:b]
                if got.ctypes.data != dst.ctypes.data:
                    if got.shape != dst.shape:
                        raise EngineError(f"{self.name}: buffer for output {name!r} is {arr.shape}; the output is {got.shape}")
                    np.copyto(dst, got)

    def close(self) -> None:
        self._pools.clear()
        self.compiled = None


def openvino_options(options: EngineOptions) -> OpenVinoOptions:
    """The backend-neutral options as OpenVINO compile settings (cache on, as for ONNX Runtime)."""
    from fsdeploy.engines.devices import openvino_device

    return OpenVinoOptions(precision=options.precision, threads=options.threads, hint=options.hint or "latency", cache_dir=cache_dir(),
                           device=openvino_device(options.device))


@register_backend("openvino", "onnx", PRECISIONS, summary="OpenVINO (CPU plugin): fp32, bf16 on AVX512-BF16/AMX, int8 QDQ",
                  where="pip install fsdeploy[openvino]", reads={"bf16": "fp32", "default": "fp32"})
def _open_openvino(source: GraphSource, options: EngineOptions) -> Engine:
    """An ONNX source on OpenVINO: the FP32 graph (run at fp32, bf16 or the plugin's default), or the INT8 QDQ graph."""
    ov_options = openvino_options(options)  # checks precision and hint
    return OpenVinoEngine(source.data if source.data is not None else source.path, ov_options)  # type: ignore[arg-type]
