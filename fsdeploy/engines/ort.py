"""ONNX Runtime backend: the embedded default (CPU provider; CUDA when onnxruntime-gpu is installed)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.bundle.manifest import TensorSpec
from fsdeploy.bundle.sources import GraphSource
from fsdeploy.deps import require
from fsdeploy.engines import EngineOptions, register_backend
from fsdeploy.engines.base import Engine
from fsdeploy.engines.ort_cache import open_cached
from fsdeploy.engines.ort_cuda import CUDA, CudaIO, preload_cuda, provider_list
from fsdeploy.errors import UnknownName

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def default_providers() -> tuple[str, ...]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    ort = require("onnxruntime")
    avail = ort.get_available_providers()
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail)


# Measured (12 interleaved rounds of 32 batch-1 images, decode + preprocess + run, 2 threads, idle 2-core
# box): efficientnet_b0 633 / 576 / 571 ms for off / run / always, CaSE efficientnet_b0 637 / 553 / 512 ms,
# resnet18 1100 / 1083 / 1023 ms; at batch 16 the three are within 3%. After one run, "always" burns 0.04 s
# of CPU in the next 0.5 s and "run" none.
SPIN_MODES = ("off", "run", "always")


@dataclass(frozen=True)
class OrtOptions:
    """Session settings. `threads=None` uses all physical cores (ORT's default)."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None
    graph_opt: str = "all"  # disable | basic | extended | all
    # ORT's workers busy-wait for work between the parallel sections of a run. "run": only while a run is
    # in progress (ORT's session.force_spinning_stop stops them the moment it returns); "always": also
    # between runs (ORT's default, for graphs run back to back); "off": they sleep whenever idle. Spinning
    # after a run steals a 2-core device's cores from preprocessing and the head fit, so "run" is the
    # default; it is 9-13% faster than "off" for efficientnet_b0 at batch 1 (see SPIN_MODES).
    spinning: str = "run"
    cpu_arena: bool = True  # the arena keeps peak buffers for reuse; off for graphs that run once
    device_id: int = 0  # the GPU of the CUDA provider
    # Where optimised graphs are cached (`fsdeploy.engines.ort_cache`); None re-optimises at every open.
    # Only CPU sessions of graph files at graph_opt "all" use it.
    cache_dir: Path | None = None


def _session_options(ort: Any, options: OrtOptions, level: str) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    threads = options.threads or int(os.environ.get("FSDEPLOY_THREADS", "0")) or 0
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = options.cpu_arena
    if options.spinning not in SPIN_MODES:
        raise UnknownName(f"ONNX Runtime spinning must be one of {', '.join(SPIN_MODES)}; got {options.spinning!r}")
    allow = "0" if options.spinning == "off" else "1"
    so.add_session_config_entry("session.intra_op.allow_spinning", allow)
    so.add_session_config_entry("session.inter_op.allow_spinning", allow)
    if options.spinning == "run":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return TensorSpec(shape, _ORT_TYPES.get(arg.type, "float32"))


class OrtEngine(Engine):
    """An ONNX Runtime InferenceSession behind the Engine interface."""

    def __init__(self, onnx_path: str | Path | bytes, options: OrtOptions | None = None) -> None:
        ort = require("onnxruntime")
        options = options or OrtOptions()
        self.providers = options.providers or default_providers()

        def make_options(optimise: bool) -> Any:
            return _session_options(ort, options, options.graph_opt if optimise else "disable")

        cacheable = (
            options.cache_dir is not None and not isinstance(onnx_path, bytes) and options.graph_opt == "all"
            and tuple(self.providers) == ("CPUExecutionProvider",)
        )
        if cacheable:
            self.session = open_cached(ort, Path(onnx_path), make_options, self.providers, options.cache_dir)  # type: ignore[arg-type]
        else:
            model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
            preload_cuda(ort, self.providers)
            self.session = ort.InferenceSession(model, sess_options=make_options(True), providers=provider_list(self.providers, options.device_id))
        label = "in-memory graph" if isinstance(onnx_path, bytes) else Path(onnx_path).name
        self.name = f"onnxruntime[{self.session.get_providers()[0]}]:{label}"
        self._inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self._outputs = {a.name: _spec(a) for a in self.session.get_outputs()}
        self._cuda = CudaIO(ort, self.session, {n for n, s in self._inputs.items() if s.shape and not isinstance(s.shape[0], int)},
                            device_id=options.device_id) \
            if self.session.get_providers()[0] == CUDA else None  # device buffers; γ stays on the GPU

    def input_specs(self) -> dict[str, TensorSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, TensorSpec]:
        return dict(self._outputs)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self._outputs)
        if self._cuda is not None:
            return self._cuda.run(feeds, names)
        return dict(zip(names, self.session.run(names, feeds)))

    def _run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """IOBinding: ORT reads the feeds in place and writes straight into the caller's buffers."""
        if self._cuda is not None:  # device buffers, then one copy into the caller's host arrays
            super()._run_into(feeds, outputs)
            return
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name in self._outputs.keys() - outputs.keys():
            binding.bind_output(name, "cpu")  # computed by ORT into its own buffer, then dropped
        self.session.run_with_iobinding(binding)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


@register_backend("ort", "onnx", ("fp32", "int8"), summary="ONNX Runtime (CPU; CUDA with onnxruntime-gpu)")
def _open_ort(source: GraphSource, options: EngineOptions) -> Engine:
    from fsdeploy.engines.ort_cache import cache_dir

    from fsdeploy.engines.devices import ort_providers

    providers, device_id = ort_providers(options.device)
    ort_options = OrtOptions(
        providers=options.providers or providers, device_id=device_id, threads=options.threads, spinning=options.spinning or "run",
        cpu_arena=options.cpu_arena, cache_dir=cache_dir(),
    )
    return OrtEngine(source.data if source.data is not None else source.path, ort_options)  # type: ignore[arg-type]
