"""Resolve a bundle graph to a *source* an engine can open: an ONNX file or bytes, TensorRT plans, a torch module.

Engines never read a bundle's layout themselves: `resolve(bundle, graph, precision, kind)` is the one place
that knows where the FP32 graph, its INT8 or FP16 variant, or its TensorRT plans live and whether they are
still made from the current graph. `kind` is what the engine consumes (each engine backend declares it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdeploy.bundle.folder import Bundle
from fsdeploy.bundle.manifest import TensorSpec, Variant
from fsdeploy.errors import BundleError, InvalidInput

KINDS = ("onnx", "trt", "torch")
MAKE_VARIANT = {  # how a missing variant is made, by (kind, precision)
    ("onnx", "int8"): "make one with `fsdeploy quantize {bundle} --calib DIR` (a folder of real images)",
    ("onnx", "fp16"): "make one with `fsdeploy build {bundle} --precision fp16`",
}


@dataclass(frozen=True)
class TorchModule:
    """A torch module as a source: `module` is an nn.Module or a zero-argument loader returning one."""

    module: Any
    input_order: tuple[str, ...]  # the module's positional inputs
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class GraphSource:
    """What an engine opens. Exactly one of `path`, `data`, `torch` is set, or `candidates` (TensorRT plans).

    Attributes:
        name: the bundle graph's name (or the file's, for a free-standing graph).
        kind: "onnx" | "trt" | "torch".
        inputs, outputs: the signature the manifest records (empty for a free-standing graph).
        candidates: plan variants an engine chooses among (TensorRT: by version and batch profile).
        bundle: the bundle it came from, for messages and for engines that check records against it.
    """

    name: str
    kind: str = "onnx"
    path: Path | None = None
    data: bytes | None = None
    torch: TorchModule | None = None
    precision: str = "fp32"
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    candidates: tuple[Variant, ...] = ()
    bundle: Bundle | None = None

    @classmethod
    def of(cls, source: GraphSource | str | Path | bytes) -> GraphSource:
        """A source from a file path or ONNX bytes (or a source, unchanged)."""
        if isinstance(source, GraphSource):
            return source
        if isinstance(source, (bytes, bytearray, memoryview)):
            return cls("graph", data=bytes(source))
        if isinstance(source, (str, Path)):
            path = Path(source)
            return cls(path.stem, kind="trt" if path.suffix in (".engine", ".plan") else "onnx", path=path)
        raise InvalidInput(f"cannot open a {type(source).__name__} as a graph; pass an ONNX path or bytes, or resolve a bundle graph")

    def describe(self) -> str:
        where = self.path or (f"{len(self.data)} bytes" if self.data is not None else self.bundle.path if self.bundle else "")
        return f"{self.name} ({self.kind} {self.precision}, {where})"


def resolve(bundle: Bundle, graph: str, precision: str = "fp32", kind: str = "onnx") -> GraphSource:
    """The source of `graph` at `precision` for an engine that consumes `kind`.

    Raises:
        BundleError: an unknown graph, no variant at that precision, or one made from an older graph.
        InvalidInput: an unknown kind.
    """
    path = bundle.graph_path(graph)  # raises for an unknown graph
    m = bundle.manifest
    info = m.graphs[graph]
    sig = {"inputs": info.inputs, "outputs": info.outputs}
    if kind == "torch":
        return GraphSource(graph, "torch", precision=precision, bundle=bundle, **sig)
    if kind == "trt":
        return GraphSource(graph, "trt", precision=precision, candidates=tuple(m.find_variants(graph, kind="trt", precision=precision)),
                           bundle=bundle, **sig)
    if kind != "onnx":
        raise InvalidInput(f"unknown source kind {kind!r}; known: {', '.join(KINDS)}")
    if precision == "fp32":
        return GraphSource(graph, "onnx", path=path, precision="fp32", bundle=bundle, **sig)
    found = m.find_variants(graph, kind="onnx", precision=precision)
    make = MAKE_VARIANT.get((kind, precision), "").format(bundle=bundle.path)
    if not found:
        others = sorted({v.graph for v in m.find_variants(kind="onnx", precision=precision)})
        if others:
            raise BundleError(f"bundle {bundle.path} has an {precision} graph for {', '.join(map(repr, others))} only, not {graph!r}; run {graph!r} at fp32")
        raise BundleError(f"bundle {bundle.path} has no {precision} graph; {make or 'run it at fp32'}")
    current = m.graph_sha256(graph)
    fresh = [v for v in found if v.graph_sha256 == current]
    if not fresh:
        redo = make.replace("make one with", "re-run") if make else "run it at fp32"
        raise BundleError(f"the {precision} graph in {bundle.path} was made from an older {info.file}; {redo}")
    return GraphSource(graph, "onnx", path=bundle.file(fresh[-1].file), precision=precision, bundle=bundle, **sig)
