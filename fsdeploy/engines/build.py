"""Build TensorRT engines from ONNX graphs with Polygraphy's loaders, and record what was really built.

The chain is Polygraphy's: `NetworkFromOnnxPath` (strongly typed where the API has it, so layer types are
the ONNX graph's own) -> `CreateConfig` / `CreateConfigRTX` (one optimisation profile: every input axis
named `batch` gets MIN/OPT/MAX, every other axis stays static, e.g. CaSE's gamma `(G,)`) ->
`EngineBytesFromNetwork` -> an atomic write. FP16 is not a builder flag here but an ONNX transform done
first (`fsdeploy.engines.onnx_fp16`); after the build the layer precisions are counted and an engine
whose counts contradict its label is refused.

TF32 is switched off, so an `fp32` engine computes in FP32. With TensorRT-RTX the build runs ahead of
time on the CPU; a refittable build is the exception (its compiler needs a GPU for refittable weights), so
refit builds and all running need a GPU.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fsdeploy.atomic import sha256_file, write_bytes
from fsdeploy.bundle import Bundle, Variant, checked_sha256, load_bundle, record_variant
from fsdeploy.deps import require
from fsdeploy.engines.onnx_fp16 import fp16_onnx
from fsdeploy.engines.trt_backend import TrtBackend, gpu_present, load_backend
from fsdeploy.engines.trt_targets import check_build_target
from fsdeploy.engines.trt_precision import check_label, inspect_precisions, network_precisions
from fsdeploy.engines.trt_records import (
    BATCH_AXIS,
    ENGINE_DIR,
    PRECISIONS,
    VARIANT_KIND,
    BatchProfile,
    EngineRecord,
    as_variant,
    engine_filename,
    engine_problem,
    engine_records,
)
from fsdeploy.errors import EngineError, InvalidInput

TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"  # shared by every build of the bundle; not a listed artefact
Progress = Callable[[str], None]


def input_shapes(onnx_path: str | Path, batch: BatchProfile) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape of every graph input: `batch` axes from the profile, all others static.

    Raises:
        EngineError: an input has a dynamic axis other than `batch`.
    """
    onnx = require("onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, dict[str, list[int]]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                lo.append(dim.dim_value), mid.append(dim.dim_value), hi.append(dim.dim_value)
            elif dim.dim_param == BATCH_AXIS:
                lo.append(batch.min), mid.append(batch.opt), hi.append(batch.max)
            else:
                raise EngineError(
                    f"{Path(onnx_path).name}: input {inp.name!r} axis {axis} is dynamic ({dim.dim_param or '?'}); "
                    f"engines accept only a dynamic {BATCH_AXIS!r} axis; re-export with a static size"
                )
        shapes[inp.name] = {"min": lo, "opt": mid, "max": hi}
    return shapes


@contextlib.contextmanager
def polygraphy_quiet() -> Iterator[None]:
    """Polygraphy prints a line per step; keep its warnings and errors only."""
    from polygraphy.logger import G_LOGGER

    colors = G_LOGGER.colors
    G_LOGGER.colors = False  # else the first line logged is a hint to install the `colored` package
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING), warnings.catch_warnings():
            # Polygraphy always attaches a timing cache; TensorRT-RTX warns that caches are no-ops there.
            warnings.filterwarnings("ignore", message=".*[Tt]iming cache.*", category=DeprecationWarning)
            yield
    finally:
        G_LOGGER.colors = colors


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    profile: BatchProfile,
    precision: str,
    refittable: Sequence[str] = (),
    timing_cache: str | Path | None = None,
    opt_level: int | None = None,
    current_gpu: bool = False,
    graph: str = "",
    graph_sha256: str | None = None,
    backend: TrtBackend | None = None,
) -> EngineRecord:
    """Build one engine from `onnx_path`, write it atomically to `out_path`, and describe it.

    Args:
        onnx_path: the graph to build; for `fp16` the FP16 transform of the bundle graph.
        out_path: engine file to write.
        profile: batch sizes for every `batch` axis.
        precision: `fp32` or `fp16`: checked against the built network's real layer types.
        refittable: ONNX initializer names to make refittable (REFIT_INDIVIDUAL); needs a GPU with TensorRT-RTX.
            In an FP16 graph the names are unchanged; a weight also read by a kept-FP32 op has a `NAME__fp32` copy.
        timing_cache: tactic timing cache file to read and extend (NVIDIA TensorRT only; RTX ignores caches).
        opt_level: builder optimisation level (0 builds fastest; default TensorRT's).
        current_gpu: TensorRT-RTX only: target the visible GPU instead of every supported one.
        graph, graph_sha256: the bundle graph this derives from (recorded for staleness checks).
        backend: TensorRT flavour (default `load_backend()`).

    Raises:
        EngineError: bad precision, unknown refittable weight, parse or build failure, or mislabelled precision.
    """
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    backend = backend or load_backend()
    check_build_target(backend.name)  # TensorRT-RTX has no SM80/SM90/SM100 target: say so before building
    trt = backend.trt
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    shapes = input_shapes(onnx_path, profile)
    pg = backend.polygraphy()
    from polygraphy.exception import PolygraphyException

    start = time.perf_counter()
    with polygraphy_quiet():
        try:
            builder, network, parser = pg.NetworkFromOnnxPath(str(onnx_path), strongly_typed=backend.strongly_typed)()
        except PolygraphyException as exc:
            raise EngineError(f"{backend.name} could not parse {onnx_path.name} ({exc}); re-export the bundle") from None
        _mark_refittable(network, refittable, onnx_path)
        counts, fp32_kinds = network_precisions(network, trt)
        if backend.strongly_typed:
            check_label(precision, counts, onnx_path.name)

        trt_profile = pg.Profile()
        for name, s in shapes.items():
            trt_profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
        kwargs: dict[str, Any] = {"profiles": [trt_profile], "builder_optimization_level": opt_level}
        if precision == "fp16" and not backend.strongly_typed and backend.has_fp16_flag:
            kwargs["fp16"] = True  # weakly typed TensorRT: the flag lets FP16 layers run in FP16
        use_cache = timing_cache is not None and backend.timing_cache
        if use_cache:
            kwargs["load_timing_cache"] = str(timing_cache)
        if backend.is_rtx and current_gpu:
            kwargs["use_gpu"] = True
        config = pg.PostprocessConfig(backend.create_config(**kwargs), _finish_config(trt, refit=bool(refittable)))
        try:
            data = pg.EngineBytesFromNetwork(
                (builder, network, parser), config=config, save_timing_cache=str(timing_cache) if use_cache else None
            )()
        except PolygraphyException as exc:
            hint = ""
            if refittable and backend.builds_on_cpu and not gpu_present():
                hint = "; TensorRT-RTX cannot compile refittable weights without a GPU: build refittable engines on the device"
            raise EngineError(f"{backend.name} {backend.version} failed to build {onnx_path.name} ({exc}; TensorRT's errors are printed above){hint}") from None
    build_s = time.perf_counter() - start
    engine_bytes = bytes(memoryview(data))
    engine_counts = inspect_precisions(engine_bytes) if gpu_present() else None
    if not backend.strongly_typed:
        if engine_counts is None:
            raise EngineError(f"{backend.name} {backend.version} cannot build strongly typed networks and no GPU is visible to inspect the engine")
        counts = engine_counts
        check_label(precision, counts, onnx_path.name)
    write_bytes(out_path, engine_bytes)
    return EngineRecord(
        file=out_path.name,
        graph=graph or onnx_path.stem.split(".")[0],
        sha256=sha256_file(out_path),
        source_onnx=onnx_path.name,
        source_sha256=sha256_file(onnx_path),
        graph_sha256=graph_sha256 or sha256_file(onnx_path),
        backend=backend.name,
        backend_version=backend.version,
        precision=precision,
        batch=profile.as_tuple(),
        input_shapes=shapes,
        layer_precisions=counts,
        precision_source="network (strongly typed: the builder keeps these types)" if backend.strongly_typed
        else "engine inspector",
        fp32_layer_kinds=fp32_kinds if precision == "fp16" else {},
        engine_layer_precisions=engine_counts,
        refittable=tuple(refittable),
        strongly_typed=backend.strongly_typed,
        target="current-gpu" if (backend.is_rtx and current_gpu) else "portable",
        build_s=round(build_s, 3),
    )


def _mark_refittable(network: Any, names: Sequence[str], onnx_path: Path) -> None:
    for name in names:
        if not network.mark_weights_refittable(name):
            onnx = require("onnx")
            known = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.initializer][:5]
            raise EngineError(
                f"{onnx_path.name} has no weights named {name!r}; refittable weights are ONNX initializer names, "
                f"e.g. {', '.join(known)}"
            )


def _finish_config(trt: Any, *, refit: bool) -> Callable[[Any, Any, Any], None]:
    """Config changes Polygraphy's loaders do not offer: TF32 off (fp32 means FP32 matmuls; TensorRT-RTX
    enables TF32 by default) and per-weight refit."""

    def finish(_builder: Any, _network: Any, config: Any) -> None:
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)
        if refit:
            flag = getattr(trt.BuilderFlag, "REFIT_INDIVIDUAL", None)
            if flag is None:
                raise EngineError("this TensorRT has no REFIT_INDIVIDUAL flag; refittable engines need TensorRT >= 10 or TensorRT-RTX")
            config.set_flag(flag)

    return finish


def build_bundle(
    bundle: Bundle | str | Path,
    *,
    precision: str,
    batch: BatchProfile | str | Sequence[int] = (1, 8, 32),
    graphs: Sequence[str] | None = None,
    progress: Progress | None = None,
    force: bool = False,
    opt_level: int | None = None,
    refittable: Mapping[str, Sequence[str]] | None = None,
    current_gpu: bool = False,
) -> list[EngineRecord]:
    """Build (or reuse) one engine per bundle graph and list each in the manifest with its sha256.

    An existing engine is reused only when it matches the graph's current sha, this TensorRT's version, the
    precision, the profile and its own sha; a stale or corrupt one is rebuilt and engines of an older graph
    are deleted. Engines of another TensorRT are kept for the machines that have it.

    Args:
        bundle: a bundle folder (or loaded Bundle; the manifest is re-read from disk).
        precision: `fp32`, or `fp16` (the graph's FP16 transform is written beside it, e.g. `features.fp16.onnx`).
        batch: `MIN:OPT:MAX` for every `batch` axis.
        graphs: graph names to build (default: all).
        progress: called with one line per step.
        force: rebuild even when an engine is up to date.
        opt_level: builder optimisation level (0 builds fastest).
        refittable: graph name -> ONNX initializer names to make refittable (needs a GPU with TensorRT-RTX).
        current_gpu: TensorRT-RTX: target the visible GPU rather than every supported one.

    Raises:
        BundleError: a graph file changed since export, or an unknown graph name.
        EngineError: a build failed (see `build_engine`).
    """
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    say = progress or (lambda _msg: None)
    b = load_bundle(bundle.path if isinstance(bundle, Bundle) else bundle, verify=False)
    profile = batch if isinstance(batch, BatchProfile) else BatchProfile.parse(batch)
    names = list(graphs) if graphs else list(b.manifest.graphs)
    for name in names:
        b.graph_path(name)
    backend = load_backend()
    records = []
    for name in names:
        graph_rel = b.manifest.graphs[name].file
        graph_sha = checked_sha256(b, graph_rel)
        refit = tuple((refittable or {}).get(name, ()))
        rel = f"{ENGINE_DIR}/" + engine_filename(
            name, graph_sha, backend.tag, precision, profile, refit=bool(refit), current_gpu=current_gpu and backend.is_rtx
        )
        old = engine_records(b.manifest).get(rel)
        if old is not None and not force:
            problem = engine_problem(b, old, backend=backend.name, version=backend.version)
            if problem is None and old.refittable == refit:
                say(f"{name}: {rel} is up to date")
                records.append(old)
                continue
            say(f"{name}: rebuilding, {problem.message if problem else 'refittable weights changed'}")
        source_rel = graph_rel if precision == "fp32" else _fp16_source(b, name, graph_rel, graph_sha, say)
        say(f"{name}: building {precision} engine with {backend.name} {backend.version}, batch {profile.min}:{profile.opt}:{profile.max}")
        record = build_engine(
            b.file(source_rel), b.file(rel), profile=profile, precision=precision, refittable=refit,
            timing_cache=b.file(TIMING_CACHE) if backend.timing_cache else None, opt_level=opt_level,
            current_gpu=current_gpu, graph=name, graph_sha256=graph_sha, backend=backend,
        )
        record = replace(record, file=rel, source_onnx=source_rel)
        say(f"{name}: built in {record.build_s:.1f} s, layers {record.layer_precisions}")
        b = _record_engine(b, record)
        records.append(record)
    return records


def _fp16_source(bundle: Bundle, graph: str, graph_rel: str, graph_sha: str, say: Progress) -> str:
    """The graph's FP16 transform (its fp16 ONNX variant), reused when it was made from this graph."""
    rel = f"{Path(graph_rel).stem}.fp16.onnx"
    path = bundle.file(rel)
    listed = bundle.manifest.files.get(rel)
    derived = any(v.graph_sha256 == graph_sha and v.sha256 == listed
                  for v in bundle.manifest.find_variants(graph, kind="onnx", precision="fp16") if v.file == rel) or any(
        r.source_onnx == rel and r.graph_sha256 == graph_sha and r.source_sha256 == listed
        for r in engine_records(bundle.manifest).values()  # bundles built before the FP16 graph was a variant
    )
    if derived and path.is_file() and sha256_file(path) == listed:
        return rel
    say(f"{graph}: writing FP16 transform {rel}")
    fp16_onnx(bundle.file(graph_rel), path)
    return rel


def _record_engine(bundle: Bundle, record: EngineRecord) -> Bundle:
    """List `record` (and its source) in the manifest; delete engines built from an older version of its graph."""
    def older(v: Variant) -> bool:
        return v.kind == VARIANT_KIND and v.graph == record.graph and v.graph_sha256 != record.graph_sha256

    graph_file = bundle.manifest.graphs[record.graph].file
    if record.source_onnx != graph_file:  # the FP16 transform it was built from: a variant of the graph too
        fp16 = Variant(record.source_onnx, record.graph, "onnx", record.precision, record.graph_sha256, record.source_sha256,
                       {"transform": "onnxconverter-common float16, statistics kept fp32"})
        bundle, _ = record_variant(bundle, fp16)
    b, dropped = record_variant(bundle, as_variant(record), supersedes=older)
    for rel in dropped:
        if rel not in b.manifest.files:
            bundle.file(rel).unlink(missing_ok=True)
    return b
