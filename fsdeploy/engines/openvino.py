"""OpenVINO backend (CPU plugin): reads a bundle's ONNX graphs directly; FP32, bf16 and INT8 from QDQ graphs.

Precisions, set through the CPU plugin's INFERENCE_PRECISION_HINT:
- `fp32`: f32 everywhere (matches ONNX Runtime FP32 to float rounding).
- `bf16`: bf16 matmuls and convolutions (f32 accumulation); needs a CPU whose OPTIMIZATION_CAPABILITIES list
  BF16 (AVX512-BF16 or AMX). It is the plugin's own default on such CPUs.
- `bf16-mixed`: bf16, except the layers at high resolution (feature maps at least 1/8 of the input's height:
  stem and early blocks), which keep f32 through OpenVINO's own per-node mark (`mark_f32`,
  `mixed_f32_layers`): on the glyph-trained efficientnet_b0 plain bf16 fails the 99% decision gate and this
  passes it.
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
from fsdeploy.errors import EngineError, InvalidInput, UnknownName

PRECISIONS = ("fp32", "bf16", "bf16-mixed", "int8", "default")
HINTS = ("latency", "throughput")
ENV = "FSDEPLOY_OPENVINO_CACHE"
OFF = {"0", "off", "no", "false", "none", ""}
_INFERENCE_TYPE = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "bf16-mixed": "bf16"}  # precision -> INFERENCE_PRECISION_HINT
# bf16-mixed: layers whose feature maps are at least 1/MIXED_F32_STRIDE of the input's height stay f32 (see mixed_f32_layers)
MIXED_F32_STRIDE = 8
KEEP_F32 = '<attribute name="DisablePrecisionConversion" version="0" value="dynamic:dynamic"/>'  # the IR form of ov::disable_conversion


def bf16_capable(device: str = "CPU") -> bool:
    """Whether OpenVINO lists BF16 among `device`'s OPTIMIZATION_CAPABILITIES (AVX512-BF16 or AMX on CPUs)."""
    ov = require("openvino")
    return "BF16" in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")


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
    # ports callers rely on (None: all); at bf16 the others may pass as bf16 (see `internal_ports`, `bf16_state_model`)
    public_io: tuple[str, ...] | None = None
    image_height: int | None = None  # bf16-mixed's reference height (None: the graph's 4-D input's)
    static_batch: int | None = None  # also compile for exactly this batch and use it for batches of that size

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UnknownName(f"OpenVINO runs precision {', '.join(PRECISIONS)}; got {self.precision!r} (fp16 runs on --backend trt)")
        if self.hint not in HINTS:
            raise UnknownName(f"OpenVINO performance hint must be latency or throughput; got {self.hint!r}")
        if self.static_batch is not None and (isinstance(self.static_batch, bool) or not isinstance(self.static_batch, int)
                                              or self.static_batch < 1):
            raise InvalidInput(f"static batch must be a whole number of images >= 1, got {self.static_batch!r}")


def compile_config(options: OpenVinoOptions, capabilities: list[str]) -> dict[str, Any]:
    """The plugin properties for `options` on a device with `capabilities` (OPTIMIZATION_CAPABILITIES).

    Raises:
        UnknownName: bf16 on a CPU without BF16 support.
    """
    config: dict[str, Any] = {"PERFORMANCE_HINT": options.hint.upper()}
    threads = options.threads or int(os.environ.get("FSDEPLOY_THREADS", "0")) or 0
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if options.precision in ("bf16", "bf16-mixed") and "BF16" not in capabilities:
        raise UnknownName(
            f"this {options.device} has no bf16 support (OpenVINO lists {', '.join(capabilities)}); "
            "use --precision fp32 or int8 (bf16 needs AVX512-BF16 or AMX)"
        )
    if options.precision in _INFERENCE_TYPE:
        config["INFERENCE_PRECISION_HINT"] = _INFERENCE_TYPE[options.precision]
    return config


def _cache_entry(root: Path, model: Path | bytes, version: str, variant: str = "") -> Path:
    """The folder holding one source graph's compiled blobs (`variant`: how its ports were rewritten, if they were)."""
    if isinstance(model, bytes):
        stem, source = "graph", hashlib.sha256(model).hexdigest()
    else:
        st = model.stat()
        stem, source = model.stem, f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(f"{source}|{version}|{cpu_signature()}{'|' + variant if variant else ''}".encode()).hexdigest()[:20]
    return root / f"{stem}-{key}"


BF16_CARRIER = np.uint16  # numpy has no bfloat16: bf16 ports take and give their bits as uint16 arrays


def internal_ports(model: Any, public: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Ports of `model` (inputs and outputs) that are not `public` and are feature maps `(n, C, H, W)` with
    H * W > 1: the CaSE stage state. Small tensors (per-image means `(n, C, 1, 1)`) stay f32."""
    out = []
    for port in [*model.inputs, *model.outputs]:
        if port.get_names() & set(public):
            continue
        shape = port.get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() == 4 and all(d.is_static for d in list(shape)[1:]):
            _, _, h, w = (d.get_length() if d.is_static else 0 for d in shape)
            if h * w > 1:
                out.append((port.get_any_name(), port))
    return out


def bf16_state_model(ov: Any, model: Any, public: tuple[str, ...]) -> tuple[Any, int]:
    """`model` with its internal feature-map ports (`internal_ports`) taken and given as bf16 tensors.

    Why: at bf16 the CPU plugin computes in bf16 on channels-last layouts, so an f32 state costs a
    conversion + reorder on the way out of every stage and again on the way into the next (OpenVINO's
    per-node profile, efficientnet_b0 at 224 px, 4-image chunks, 1 thread: reorders 30 of 79 ms over the 20
    stages with f32 state, 18 of 69 ms with bf16). An NHWC tensor layout was slower still: the plugin puts
    explicit Transposes at the ports instead of folding them into its reorders. The values the next
    stage reads are the bf16 values its first kernel would round them to anyway, apart from the graph tail
    the plugin keeps in f32 (an add or multiply before an output), now rounded at the cut.
    Returns the model and how many ports changed.
    """
    ports = internal_ports(model, public)
    if not ports:
        return model, 0
    ppp = ov.preprocess.PrePostProcessor(model)
    inputs = {p.get_any_name() for p in model.inputs}
    for name, _ in ports:
        info = ppp.input(name) if name in inputs else ppp.output(name)
        info.tensor().set_element_type(ov.Type.bf16)
    return ppp.build(), len(ports)


def static_batch_model(ov: Any, model: Any, batch: int) -> Any:
    """`model` with the first axis of every input where it is dynamic (the batch) fixed to `batch`."""
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0 and not shape[0].is_static:
            shape[0] = ov.Dimension(batch)
            shapes[port.get_any_name()] = shape
    if shapes:
        model.reshape(shapes)
    return model


def _runs_bf16(options: OpenVinoOptions, capabilities: list[str]) -> bool:
    return options.precision in ("bf16", "bf16-mixed") or options.precision == "default" and "BF16" in capabilities


def mixed_f32_layers(model: Any, stride: int = MIXED_F32_STRIDE, height: int | None = None) -> list[str]:
    """Names of the ops `bf16-mixed` keeps in f32: every op whose output is a feature map `(n, C, H, W)` with
    H >= the input image's height / `stride` (the stem and the high-resolution blocks), and every op without a
    spatial output (a squeeze-and-excitation branch, a shape computation) whose non-constant inputs all come
    from kept ops. Local and order-free, so a graph cut into stages marks the same ops as the whole graph.

    Why (measured on the shipped glyph efficientnet_b0, 32 px, 1,000 novel-class images, OpenVINO 2026.4):
    bf16 everywhere keeps 97.6% / 94.9% of FP32's 1- / 5-shot decisions (centred cosine min 0.13). Keeping
    the stem and blocks 0-2 (stride <= 8) in f32 gives 99.9% / 100% (min 0.97); keeping blocks 4-6, where
    the BatchNorm channels with near-zero running variance are (gain |gamma|/sqrt(var) up to 330), changes
    nothing (min 0.13). The error enters where the maps are large and mostly flat background and is
    amplified by everything after it.

    `height`: the image height the rule is relative to; None: the graph's first 4-D input's (right for graphs
    that take the images; a CaSE stage that starts mid-network needs the bundle's, `EngineOptions.image_height`).
    """
    def spatial(shape: Any) -> int | None:  # H of an (n, C, H, W) map with H * W > 1, else None
        if shape.rank.is_static and shape.rank.get_length() == 4 and shape[2].is_static and shape[3].is_static:
            h, w = shape[2].get_length(), shape[3].get_length()
            return h if h * w > 1 else None
        return None

    if height is None:
        height = next((h for p in model.inputs if (h := spatial(p.get_partial_shape())) is not None), None)
        if height is None:
            return []
    kept: set[str] = set()
    constant: set[str] = set()  # constants and ops computed from constants only (a reshaped bias, say)
    names = []
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        sources = [v.get_node().get_friendly_name() for v in op.input_values()]
        if kind == "Constant" or kind != "Parameter" and sources and all(s in constant for s in sources):
            constant.add(op.get_friendly_name())
            continue
        if kind == "Result":
            continue
        h = spatial(op.get_output_partial_shape(0)) if op.get_output_size() else None
        if h is not None:
            keep = h * stride >= height
        else:
            live = [s for s in sources if s not in constant]
            keep = kind != "Parameter" and bool(live) and all(s in kept for s in live)
        if keep:
            kept.add(op.get_friendly_name())
            if kind != "Parameter":
                names.append(op.get_friendly_name())
    return names


def mark_f32(xml: str, names: set[str]) -> tuple[str, int]:
    """The IR text `xml` with every layer named in `names` marked to keep its original (f32) precision.

    OpenVINO's mechanism is the `DisablePrecisionConversion` runtime attribute (`ov::disable_conversion`),
    which the CPU plugin reads when it lowers the graph to bf16 (`Node::keepOrigPrecision`, skipped by
    `Graph::EnforceInferencePrecision`). Python cannot create that attribute, but the IR reader does from
    `<rt_info><attribute name="DisablePrecisionConversion" .../>`, so the marks go into the IR.
    """
    import re
    import xml.sax.saxutils as su

    count = 0

    def add(match: re.Match[str]) -> str:
        nonlocal count
        head, body = match.group(1), match.group(2)
        name = re.search(r' name="([^"]*)"', head)
        if name is None or su.unescape(name.group(1), {"&quot;": '"'}) not in names:
            return match.group(0)
        count += 1
        if "<rt_info>" in body:
            return head + body.replace("<rt_info>", "<rt_info>" + KEEP_F32, 1) + "</layer>"
        return head + body + "<rt_info>" + KEEP_F32 + "</rt_info></layer>"

    out = re.sub(r"(<layer [^>]*>)(.*?)</layer>", add, xml, flags=re.S)
    return out, count


def _saved_ir(ov: Any, entry: Path, model: Any, mixed: bool = False, height: int | None = None) -> str:
    """`entry/graph.xml` (+ .bin), written from `model()` once (bin, then xml, each moved into place); with
    `mixed`, the layers of `mixed_f32_layers` carry OpenVINO's keep-f32 mark (`mark_f32`)."""
    xml = entry / "graph.xml"
    if not xml.is_file():
        tmp = entry / f"tmp-{os.getpid()}.xml"
        m = model()
        ov.save_model(m, str(tmp), compress_to_fp16=False)
        if mixed:
            text, _ = mark_f32(tmp.read_text(encoding="utf-8"), set(mixed_f32_layers(m, height=height)))
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    return str(xml)


def _is_bf16(port: Any) -> bool:
    return port.get_element_type().get_type_name() == "bf16"


def _spec(port: Any) -> TensorSpec:
    # OpenVINO keeps no names for dynamic dims; the first one is the batch in every fsdeploy graph
    shape = tuple(d.get_length() if d.is_static else "batch" if i == 0 else f"d{i}" for i, d in enumerate(port.get_partial_shape()))
    dtype = np.dtype(BF16_CARRIER) if _is_bf16(port) else np.dtype(port.get_element_type().to_dtype())
    return TensorSpec(shape, str(dtype))


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
        caps = list(core.get_property(options.device, "OPTIMIZATION_CAPABILITIES"))
        config = compile_config(options, caps)
        source = model if isinstance(model, bytes) else Path(model)
        state = options.public_io is not None and _runs_bf16(options, caps)
        mixed = options.precision == "bf16-mixed"
        self.compiled = self._compile(core, source, config, state, mixed=mixed)
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
        self._pools: dict[tuple[frozenset[str], bool], list[Any]] = {}
        self._bf16 = {n for n, p in [*self._in_ports.items(), *self._out_ports.items()] if _is_bf16(p)}
        # the same graph compiled for exactly `static_batch` images (None: no such batch, or no batched input)
        self._static = None
        if options.static_batch is not None and self._batched:
            self._static = self._compile(core, source, config, state, mixed=mixed, batch=options.static_batch)

    def _compile(self, core: Any, source: Path | bytes, config: dict[str, Any], state: bool = False, mixed: bool = False,
                 batch: int | None = None) -> Any:
        """`source` compiled with `config` (through the cache when there is one); `state`: bf16 stage state
        ports; `mixed`: bf16-mixed's f32 marks; `batch`: every input with a dynamic first axis fixed to it."""
        ov = require("openvino")
        public = self.options.public_io or ()
        rewrite = state or mixed or batch is not None
        height = self.options.image_height
        variant = "|".join(([f"bf16-state:{','.join(sorted(public))}"] if state else [])
                           + ([f"mixed-f32/{MIXED_F32_STRIDE}@{height}"] if mixed else [])
                           + ([f"batch:{batch}"] if batch is not None else []))

        def model() -> Any:
            m = core.read_model(source if isinstance(source, bytes) else str(source))
            m = bf16_state_model(ov, m, public)[0] if state else m
            return static_batch_model(ov, m, batch) if batch is not None else m

        def read() -> Any:
            if not rewrite:
                return core.read_model(source) if isinstance(source, bytes) else str(source)
            if not mixed:
                return model()
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                return core.read_model(_saved_ir(ov, Path(tmp), model, mixed, height))

        root = self.options.cache_dir
        try:
            if root is None:
                return core.compile_model(read(), self.options.device, config)
            entry = _cache_entry(root, source, ov.__version__, variant)
            before = set(entry.glob("*")) if entry.is_dir() else None
            try:
                entry.mkdir(parents=True, exist_ok=True)
                # a rewritten graph is kept as IR beside its blob: compiling from a file lets the plugin find the blob
                # by the file's hash, without reading and rewriting the ONNX graph again (0.1 s over 20 CaSE stages)
                target = _saved_ir(ov, entry, model, mixed, height) if rewrite else read()
                compiled = core.compile_model(target, self.options.device, {**config, "CACHE_DIR": str(entry)})
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

    def _requests(self, key: frozenset[str], static: bool = False) -> list[Any]:
        """One pool of infer requests per set of caller-bound outputs (and per compiled model: the dynamic
        one, or the `static_batch` one): a request that once wrote into a caller's buffer keeps it, so runs
        binding other outputs (or none) must not reuse that request."""
        if (key, static) not in self._pools:
            compiled = self._static if static else self.compiled
            self._pools[key, static] = [compiled.create_infer_request() for _ in range(1 if static else self._n_requests)]
        return self._pools[key, static]

    def _is_static(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether this call runs the `static_batch` model: one with a batch of exactly that size, run whole."""
        if self._static is None:
            return False
        return next((feeds[n].shape[0] for n in self._batched), None) == self.options.static_batch

    def _parts(self, feeds: Mapping[str, np.ndarray], static: bool = False) -> list[tuple[int, int]]:
        """Row ranges of the batch, one per request (one range under LATENCY, for small batches, or on the
        static-batch model, which takes its batch whole)."""
        batch = next((feeds[n].shape[0] for n in self._batched), 1)
        k = 1 if static else min(self._n_requests, batch)
        edges = np.linspace(0, batch, k + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def _slice(self, feeds: Mapping[str, np.ndarray], start: int, stop: int, whole: bool) -> dict[str, Any]:
        parts = {n: a if whole or n not in self._batched else a[start:stop] for n, a in feeds.items()}
        return {n: self._tensor(n, a) if n in self._bf16 else a for n, a in parts.items()}

    def _tensor(self, name: str, arr: np.ndarray) -> Any:
        """A tensor sharing `arr`'s memory; bf16 ports get their uint16 bits as a bf16 tensor."""
        ov = require("openvino")
        if name in self._bf16:
            return ov.Tensor(np.ascontiguousarray(arr), ov.Shape(list(arr.shape)), ov.Type.bf16)
        return ov.Tensor(arr, shared_memory=True)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        static = self._is_static(feeds)
        parts = self._parts(feeds, static)
        requests = self._requests(frozenset(), static)
        try:
            if len(parts) == 1:
                res = requests[0].infer(self._slice(feeds, 0, 0, True), share_inputs=True, share_outputs=False)
                return {n: self._array(n, res[n]) for n in self._out_ports}  # by name: the static model has its own ports
            for req, (a, b) in zip(requests, parts):
                req.start_async(self._slice(feeds, a, b, False), share_inputs=True)
            for req in requests[: len(parts)]:
                req.wait()
            return {n: np.concatenate([self._array(n, req.get_tensor(n).data) for req in requests[: len(parts)]])
                    for n in self._out_ports}
        except RuntimeError as exc:
            raise EngineError(f"{self.name}: {str(exc).splitlines()[0]}") from None

    def _array(self, name: str, arr: np.ndarray) -> np.ndarray:
        return arr.view(BF16_CARRIER) if name in self._bf16 else arr

    def _run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """The plugin writes straight into the caller's buffers (tensors sharing their memory); an output
        the plugin had to reallocate is copied."""
        static = self._is_static(feeds)
        parts = self._parts(feeds, static)
        requests = self._requests(frozenset(outputs), static)
        whole = len(parts) == 1
        try:
            for req, (a, b) in zip(requests, parts):
                for name, arr in outputs.items():
                    req.set_tensor(name, self._tensor(name, arr if whole else arr[a:b]))
                req.start_async(self._slice(feeds, a, b, whole), share_inputs=True)
            for req in requests[: len(parts)]:
                req.wait()
        except RuntimeError as exc:
            raise EngineError(f"{self.name}: {str(exc).splitlines()[0]}") from None
        for req, (a, b) in zip(requests, parts):
            for name, arr in outputs.items():
                got = self._array(name, req.get_tensor(name).data)
                dst = arr if whole else arr[a:b]
                if got.ctypes.data != dst.ctypes.data:
                    if got.shape != dst.shape:
                        raise EngineError(f"{self.name}: buffer for output {name!r} is {arr.shape}; the output is {got.shape}")
                    np.copyto(dst, got)

    def close(self) -> None:
        self._pools.clear()
        self.compiled = self._static = None


def openvino_options(options: EngineOptions) -> OpenVinoOptions:
    """The backend-neutral options as OpenVINO compile settings (cache on, as for ONNX Runtime)."""
    from fsdeploy.engines.devices import openvino_device

    return OpenVinoOptions(precision=options.precision, threads=options.threads, hint=options.hint or "latency", cache_dir=cache_dir(),
                           device=openvino_device(options.device), public_io=options.public_io,
                           image_height=options.image_height, static_batch=options.static_batch)


@register_backend("openvino", "onnx", PRECISIONS, summary="OpenVINO (CPU plugin): fp32, bf16 (all, or bf16-mixed: high-resolution layers f32) on AVX512-BF16/AMX, int8 QDQ",
                  where="pip install fsdeploy[openvino]", reads={"bf16": "fp32", "bf16-mixed": "fp32", "default": "fp32"})
def _open_openvino(source: GraphSource, options: EngineOptions) -> Engine:
    """An ONNX source on OpenVINO: the FP32 graph (run at fp32, bf16 or the plugin's default), or the INT8 QDQ graph."""
    ov_options = openvino_options(options)  # checks precision and hint
    return OpenVinoEngine(source.data if source.data is not None else source.path, ov_options)  # type: ignore[arg-type]
