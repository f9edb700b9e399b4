"""TensorRT engines behind fsdeploy's Engine interface, weight refit, and the ONNX Runtime comparison.

Running goes through Polygraphy's `TrtRunner` and needs a CUDA GPU; importing this module does not (it
registers the `trt` backend for `open_engine` and imports TensorRT only when an engine is opened).
Input specs come from the engine itself, and a batch outside the engine's optimisation profile is refused
with the profile's bounds before TensorRT sees it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.engines import EngineOptions, register_engine
from fsdeploy.engines.base import Engine, TensorSpec
from fsdeploy.engines.build import polygraphy_quiet
from fsdeploy.engines.trt_backend import TrtBackend, deserialize, gpu_present, load_backend
from fsdeploy.engines.trt_records import BATCH_AXIS, EngineRecord, batch_range_error, select_engine
from fsdeploy.errors import BundleError, EngineError
from fsdeploy.exporters.validate import compare_outputs


class TrtEngine(Engine):
    """A serialized TensorRT engine run with Polygraphy's TrtRunner (GPU only).

    Args:
        engine_path: the `.engine` file.
        record: its manifest record; when given, the file's sha256 must match it.
        backend: TensorRT flavour (default `load_backend()`).

    Raises:
        EngineError: no GPU, missing file, or bytes that are not an engine for this TensorRT.
        BundleError: the file does not match `record`'s sha256.
    """

    def __init__(self, engine_path: str | Path, *, record: EngineRecord | None = None, backend: TrtBackend | None = None) -> None:
        self.backend = backend or load_backend()
        path = Path(engine_path)
        if not path.is_file():
            raise EngineError(f"engine {path} does not exist; build it with `fsdeploy build BUNDLE`")
        data = path.read_bytes()
        if record is not None and hashlib.sha256(data).hexdigest() != record.sha256:
            raise BundleError(f"engine {path} does not match its sha256 in the manifest (corrupt or replaced); rebuild it with `fsdeploy build`")
        self.engine = deserialize(data, self.backend, what=f"engine {path.name}")
        from polygraphy.backend.trt import TrtRunner

        self.name = f"{self.backend.name}:{path.name}"
        self.record = record
        self._inputs, self._outputs, self._profile = _io_specs(self.engine, self.backend.trt)
        from polygraphy.exception import PolygraphyException

        self._failure = PolygraphyException
        self._runner = TrtRunner(self.engine, name=path.stem)
        try:
            with polygraphy_quiet():
                self._runner.activate()
        except PolygraphyException as exc:
            raise EngineError(f"{self.name}: TensorRT could not create an execution context ({exc})") from None

    def input_specs(self) -> dict[str, TensorSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, TensorSpec]:
        return dict(self._outputs)

    @property
    def batch_profile(self) -> dict[str, tuple[int, int, int]]:
        """Input name -> (min, opt, max) of its batch axis."""
        return {n: p[1:] for n, p in self._profile.items()}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_batch(self.name, self._profile, feeds)
        try:
            with polygraphy_quiet():
                out = self._runner.infer(feeds)
        except self._failure as exc:
            raise EngineError(f"{self.name}: inference failed ({exc})") from None
        return {k: np.array(v, copy=True) for k, v in out.items()}  # the runner reuses its host buffers

    def refit(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace refittable weights in place (see `refit`)."""
        refit(self, weights)

    def close(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()
        self._runner = None


def _io_specs(engine: Any, trt: Any) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec], dict[str, tuple[int, int, int, int]]]:
    """Input/output specs (dynamic axes named) and, per input, (batch axis, min, opt, max) of profile 0."""
    inputs: dict[str, TensorSpec] = {}
    outputs: dict[str, TensorSpec] = {}
    profile: dict[str, tuple[int, int, int, int]] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple(engine.get_tensor_shape(name))
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        dims = tuple((BATCH_AXIS if axis == 0 else f"dim{axis}") if d < 0 else int(d) for axis, d in enumerate(shape))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs[name] = TensorSpec(dims, dtype)
            dynamic = [axis for axis, d in enumerate(shape) if d < 0]
            if dynamic:
                lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
                axis = dynamic[0]
                profile[name] = (axis, int(lo[axis]), int(opt[axis]), int(hi[axis]))
        else:
            outputs[name] = TensorSpec(dims, dtype)
    return inputs, outputs, profile


def check_batch(engine: str, profile: Mapping[str, tuple[int, int, int, int]], feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse feeds whose batch axis lies outside the engine's profile (axis, min, opt, max per input).

    Raises:
        EngineError: names the input, the batch given, and the profile's min and max.
    """
    for name, (axis, lo, opt, hi) in profile.items():
        if name in feeds:
            got = int(np.shape(feeds[name])[axis])
            if not lo <= got <= hi:
                raise batch_range_error(engine, name, got, (lo, opt, hi))


def refit(engine: TrtEngine | Any, weights: Mapping[str, np.ndarray]) -> None:
    """Write new values into an engine's refittable weights (built with `refittable=[...]`), in place.

    Args:
        engine: a TrtEngine or an ICudaEngine.
        weights: ONNX initializer name -> array of the same size (cast to the engine's weight dtype).

    Raises:
        EngineError: a name that is not refittable, a size mismatch, or TensorRT refusing the refit.
    """
    backend = engine.backend if isinstance(engine, TrtEngine) else load_backend()
    trt = backend.trt
    cuda_engine = engine.engine if isinstance(engine, TrtEngine) else engine
    from polygraphy.backend.trt import util as trt_util

    refitter = trt.Refitter(cuda_engine, trt_util.get_trt_logger())
    known = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - known)
    if unknown:
        raise EngineError(
            f"engine has no refittable weights {unknown}; it has {sorted(known)[:8] or 'none'} "
            "(build with refittable weight names to make them refittable)"
        )
    alive = []  # TensorRT reads the host arrays during refit_cuda_engine: keep them referenced until then
    for name, value in weights.items():
        proto = refitter.get_weights_prototype(name)
        arr = np.ascontiguousarray(value, dtype=trt.nptype(proto.dtype))
        if arr.size != proto.size:
            raise EngineError(f"refit weight {name!r} has {arr.size} values; the engine's has {proto.size}")
        alive.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise EngineError(f"TensorRT refused new values for weight {name!r}")
    with polygraphy_quiet():
        ok = refitter.refit_cuda_engine()
    if not ok:
        raise EngineError(f"TensorRT could not refit the engine (missing weights: {list(refitter.get_missing_weights())[:8]})")


@register_engine("trt")
def _open_trt(bundle: Any, graph: str, options: EngineOptions) -> Engine:
    backend = load_backend()
    path, record = select_engine(bundle, graph, options.precision, backend=backend.name, version=backend.version)
    return TrtEngine(path, record=record, backend=backend)


@dataclass(frozen=True)
class Tolerance:
    """An output agrees when max-abs <= atol + rtol * max|reference| and cosine >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float


# FP32: TF32 is off in fsdeploy's builds, so only summation order differs. FP16: ~3 decimal digits per value.
TOLERANCES = {"fp32": Tolerance(1e-3, 0.0, 0.9999), "fp16": Tolerance(1e-2, 1e-2, 0.999)}


@dataclass(frozen=True)
class OutputAgreement:
    """One output of one graph: TensorRT against ONNX Runtime on the same inputs."""

    graph: str
    name: str
    shape_ok: bool
    max_abs: float
    ref_max_abs: float
    cosine: float
    # min over images of cos(x - μ, x_ort - μ), μ the ORT mean over the compared images (feature outputs
    # (N, D) with N > 1; NaN otherwise): what raw cosine hides (`fsdeploy.bench.agreement`)
    centred_cosine: float = float("nan")

    def ok(self, tol: Tolerance) -> bool:
        return self.shape_ok and self.max_abs <= tol.atol + tol.rtol * self.ref_max_abs and self.cosine >= tol.min_cosine


@dataclass(frozen=True)
class CompareReport:
    """Every output of the compared graphs; `passed` when each is within `tolerance`."""

    precision: str
    tolerance: Tolerance
    batch: int
    checks: tuple[OutputAgreement, ...]

    @property
    def passed(self) -> bool:
        return all(c.ok(self.tolerance) for c in self.checks)

    def worst(self) -> OutputAgreement:
        return max(self.checks, key=lambda c: (not c.ok(self.tolerance), c.max_abs - self.tolerance.rtol * c.ref_max_abs))

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "tolerance": asdict(self.tolerance), "batch": self.batch,
                "passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def compare_bundle(
    bundle: Any,
    *,
    precision: str = "fp32",
    n: int = 8,
    seed: int = 0,
    graphs: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompareReport:
    """Run ONNX Runtime (FP32 graph) and TensorRT on the same real-image inputs and compare every output.

    Inputs are `n` crops of the photos shipped with matplotlib; graphs with more inputs than images
    (CaSE query, stages) get theirs from the bundle's PyTorch modules, as export validation does.

    Raises:
        EngineError / BundleError: as `open_engine(..., 'trt')` (no GPU, no engine, stale or corrupt engine).
    """
    from fsdeploy.data.samples import real_batch
    from fsdeploy.engines.ort import OrtEngine, OrtOptions
    from fsdeploy.exporters.rebuild import torch_graphs

    say = progress or (lambda _msg: None)
    backend = load_backend()
    if not gpu_present():
        raise EngineError("`compare` runs TensorRT engines and needs a CUDA GPU; none is visible here (engines can still be built)")
    names = list(graphs) if graphs else list(bundle.manifest.graphs)
    engines = {g: select_engine(bundle, g, precision, backend=backend.name, version=backend.version, batch=n) for g in names}
    images = real_batch(bundle.manifest.preprocess, n, np.random.default_rng(seed))
    modules = torch_graphs(bundle)
    checks: list[OutputAgreement] = []
    for g in names:
        say(f"{g}: ONNX Runtime vs {backend.name} {precision}")
        feeds = modules[g].feeds(images)
        with OrtEngine(bundle.graph_path(g), OrtOptions(providers=("CPUExecutionProvider",))) as ort_engine:
            want = ort_engine.run(feeds)
        path, record = engines[g]
        with TrtEngine(path, record=record, backend=backend) as trt_engine:
            got = trt_engine.run(feeds)
        for c in compare_outputs(g, "real", got, want):
            checks.append(OutputAgreement(g, c.name, c.shape_ok, c.max_abs, c.ref_max_abs, c.cosine, _centred(got.get(c.name), want[c.name])))
    return CompareReport(precision, TOLERANCES[precision], n, tuple(checks))


def _centred(got: np.ndarray | None, want: np.ndarray) -> float:
    """Min centred cosine of per-image feature rows `(N, D)`, N > 1; NaN for other outputs."""
    from fsdeploy.bench.agreement import centred_cosines

    if got is None or got.shape != want.shape or want.ndim != 2 or len(want) < 2:
        return float("nan")
    return float(centred_cosines(got, want).min())
