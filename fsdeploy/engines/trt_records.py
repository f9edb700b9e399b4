"""TensorRT engines as a bundle lists them: batch profiles, engine records, and which engine may be used.

An engine is only valid for the exact graph, TensorRT flavour and version it was built with. Each record
carries those facts and its file's sha256, so an engine that is stale (its graph changed), corrupt, or
foreign (another TensorRT) is found from the manifest alone, without TensorRT or a GPU, and is rebuilt by
`fsdeploy build` or refused when opened; it is never silently used.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fsdeploy.atomic import sha256_file
from fsdeploy.bundle.manifest import Variant
from fsdeploy.errors import BundleError, EngineError, InvalidInput

PRECISIONS = ("fp32", "fp16")
BATCH_AXIS = "batch"
ENGINE_DIR = "engines"
VARIANT_KIND = "trt"  # fsdeploy.bundle.Variant.kind of a TensorRT plan


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine accepts (`min`..`max`) and the one it is tuned for (`opt`)."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InvalidInput(f"batch profile {self.min}:{self.opt}:{self.max} must satisfy 1 <= MIN <= OPT <= MAX, e.g. 1:8:32")

    @classmethod
    def parse(cls, text: str | Sequence[int]) -> BatchProfile:
        """From `"1:8:32"` or `(1, 8, 32)`."""
        parts = text.split(":") if isinstance(text, str) else list(text)
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3:
            raise InvalidInput(f"batch profile {text!r} is not MIN:OPT:MAX (three integers, e.g. 1:8:32)")
        return cls(*values)

    @property
    def tag(self) -> str:
        return f"b{self.min}_{self.opt}_{self.max}"

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)


@dataclass(frozen=True)
class EngineRecord:
    """One built engine as the manifest lists it (under `engines[file]`)."""

    file: str  # engine path, relative to the bundle
    graph: str  # bundle graph name
    sha256: str
    source_onnx: str  # the ONNX file the engine was built from (the graph, or its FP16 transform)
    source_sha256: str
    graph_sha256: str  # sha of the bundle graph it derives from: a mismatch means stale
    backend: str
    backend_version: str
    precision: str  # fp32 | fp16, checked against layer_precisions
    batch: tuple[int, int, int]
    input_shapes: dict[str, dict[str, list[int]]]  # input -> {"min"|"opt"|"max": shape}
    layer_precisions: dict[str, int]  # compute layers by output type: {"fp16": n, "fp32": m}
    precision_source: str  # how layer_precisions was read
    fp32_layer_kinds: dict[str, int] = field(default_factory=dict)  # fp16 engines: what stayed FP32
    engine_layer_precisions: dict[str, int] | None = None  # IEngineInspector's view, when a GPU was present
    refittable: tuple[str, ...] = ()
    strongly_typed: bool = True
    target: str = "portable"  # portable | current-gpu
    build_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch"] = list(self.batch)
        d["refittable"] = list(self.refittable)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineRecord:
        d = dict(d)
        d["batch"] = tuple(d["batch"])
        d["refittable"] = tuple(d.get("refittable", ()))
        return cls(**d)


def engine_filename(graph: str, graph_sha256: str, backend_tag: str, precision: str, batch: BatchProfile,
                    *, refit: bool = False, current_gpu: bool = False) -> str:
    """`features-<sha8>-trtrtx1.7-fp16-b1_8_32.engine`: everything that makes two engines differ."""
    extra = ("-refit" if refit else "") + ("-gpu" if current_gpu else "")
    return f"{graph}-{graph_sha256[:8]}-{backend_tag}-{precision}-{batch.tag}{extra}.engine"


def engine_records(manifest: Any) -> dict[str, EngineRecord]:
    """The manifest's TensorRT plan variants as engine records, keyed by engine path."""
    try:
        return {v.file: EngineRecord.from_dict(v.info) for v in manifest.find_variants(kind=VARIANT_KIND)}
    except (KeyError, TypeError) as exc:
        raise BundleError(f"the manifest's TensorRT variants are unreadable ({exc}); delete their entries and run `fsdeploy build`") from None


def as_variant(record: EngineRecord) -> Variant:
    """The manifest's one record type for a file derived from a graph (`fsdeploy.bundle.Variant`)."""
    return Variant(record.file, record.graph, VARIANT_KIND, record.precision, record.graph_sha256, record.sha256, record.to_dict())


@dataclass(frozen=True)
class EngineProblem:
    """Why an engine cannot be used here. `kind`: stale | missing | corrupt | foreign."""

    kind: str
    message: str

    def error(self) -> Exception:
        """The exception to raise when someone asks to use the engine anyway."""
        cls = EngineError if self.kind == "foreign" else BundleError
        return cls(f"{self.message}; rebuild it with `fsdeploy build`")


def engine_problem(bundle: Any, record: EngineRecord, *, backend: str, version: str) -> EngineProblem | None:
    """None when `record` is usable with this TensorRT (`backend`, `version`); otherwise what is wrong."""
    m = bundle.manifest
    info = m.graphs.get(record.graph)
    if info is None or m.files.get(info.file) != record.graph_sha256:
        return EngineProblem(
            "stale", f"engine {record.file} was built for another graph {record.graph!r} (sha {record.graph_sha256[:8]}, bundle has "
            f"{(m.files.get(info.file) or 'none')[:8] if info else 'no such graph'})"
        )
    if m.files.get(record.source_onnx) != record.source_sha256:
        return EngineProblem("stale", f"engine {record.file} was built from a {record.source_onnx} that has since changed")
    path = Path(bundle.path) / record.file
    if not path.is_file():
        return EngineProblem("missing", f"engine {record.file} is listed in the manifest but missing")
    if sha256_file(path) != record.sha256:
        return EngineProblem("corrupt", f"engine {record.file} does not match its sha256 in the manifest (corrupt or replaced)")
    if (record.backend, record.backend_version) != (backend, version):
        return EngineProblem(
            "foreign", f"engine {record.file} was built with {record.backend} {record.backend_version}; this machine has {backend} {version}"
        )
    return None


def select_engine(bundle: Any, graph: str, precision: str, *, backend: str, version: str,
                  batch: int | None = None) -> tuple[Path, EngineRecord]:
    """The usable engine for `graph` at `precision` (holding `batch` in its profile when given).

    Raises:
        EngineError: no such engine, only foreign ones, or none whose profile holds `batch`.
        BundleError: the only candidates are stale, missing or corrupt.
    """
    bundle.graph_path(graph)
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    candidates = [r for r in engine_records(bundle.manifest).values() if r.graph == graph and r.precision == precision]
    if not candidates:
        raise EngineError(
            f"bundle {bundle.path} has no {precision} TensorRT engine for graph {graph!r}; "
            f"build one with `fsdeploy build {bundle.path} --precision {precision}`"
        )
    problems = {r.file: engine_problem(bundle, r, backend=backend, version=version) for r in candidates}
    usable = [r for r in candidates if problems[r.file] is None]
    if not usable:
        mine = [p for r, p in ((r, problems[r.file]) for r in candidates) if r.backend == backend and p is not None]
        raise (mine or [p for p in problems.values() if p is not None])[0].error()
    if batch is not None:
        fitting = [r for r in usable if r.batch[0] <= batch <= r.batch[2]]
        if not fitting:
            ranges = ", ".join(f"{r.batch[0]}..{r.batch[2]}" for r in usable)
            raise EngineError(f"no {precision} engine for {graph!r} accepts batch {batch} (profiles: {ranges}); rebuild with --batch MIN:OPT:MAX")
        usable = fitting
    best = max(usable, key=lambda r: (r.target == "current-gpu", r.batch[2]))
    return Path(bundle.path) / best.file, best


def batch_range_error(engine: str, name: str, got: int, batch: Sequence[int]) -> EngineError:
    """The one-line error for a batch outside an engine's profile."""
    lo, opt, hi = batch
    return EngineError(
        f"{engine}: input {name!r} has batch {got}, outside this engine's profile (min {lo}, max {hi}, opt {opt}); "
        f"split the batch or rebuild with `fsdeploy build --profile {lo}:{opt}:{max(hi, got)}`"
    )
