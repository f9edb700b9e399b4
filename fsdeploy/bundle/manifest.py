"""Typed manifest records: what a bundle folder holds and the contracts engines and the runtime read.

`manifest.json` is the one place a bundle describes itself. Everything generic code reads from it is a
typed record here, never a string key into a free dict: graphs (`GraphInfo`, `TensorSpec`), the CaSE γ
layout and chunked scheme (`CaseLayout`), and every file derived from a graph for one engine or
precision (`Variant`: the INT8 QDQ graph, the FP16 transform, TensorRT plans, any future engine file).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fsdeploy.backbones import Preprocess
from fsdeploy.errors import BundleError

SCHEMA = 1
LEGACY_INT8_KEY = "int8"  # bundles written before `variants` kept their INT8 record in extra["int8"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape with named dynamic axes (str) and a numpy dtype name."""

    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(tuple(d["shape"]), str(d.get("dtype", "float32")))


@dataclass(frozen=True)
class GraphInfo:
    """One ONNX graph of the bundle: its file and its tensor signature."""

    file: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphInfo:
        return cls(
            d["file"],
            {k: TensorSpec.from_dict(v) for k, v in d["inputs"].items()},
            {k: TensorSpec.from_dict(v) for k, v in d["outputs"].items()},
        )


@dataclass(frozen=True)
class GammaSlice:
    """Where one CaSE block's scales sit in the task's γ vector."""

    site: str
    offset: int
    length: int

    @property
    def stop(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class CaseLayout:
    """What the CaSE runtime needs from a bundle: the γ layout and the exact chunked scheme's graphs.

    Stored in `manifest.extra` under the keys it always had (`gamma_layout`, `gamma_size`, `chunked`), so
    bundles exported before this record read unchanged.
    """

    slices: tuple[GammaSlice, ...]
    gamma_size: int
    stages: tuple[str, ...] = ()
    gamma_graph: str = "case_gamma"
    state_floats_per_image: tuple[int, ...] = ()
    scheme: str = ""

    @property
    def chunked(self) -> bool:
        return bool(self.stages)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], where: str = "bundle") -> CaseLayout:
        """Read the record; a bundle without it gets a one-line fix.

        Raises:
            BundleError: no γ layout (not a CaSE bundle) or an unreadable one.
        """
        if "gamma_layout" not in extra:
            raise BundleError(f"{where} has no CaSE gamma layout; is it a CaSE bundle? re-export with `fsdeploy export MODEL --adapter case`")
        try:
            slices = tuple(GammaSlice(str(s.get("site", s.get("name", ""))), int(s["offset"]), int(s["length"]))
                           for s in extra["gamma_layout"])
            size = int(extra.get("gamma_size", max((s.stop for s in slices), default=0)))
            chunked = extra.get("chunked") or {}
            return cls(slices, size, tuple(chunked.get("stages", ())), str(chunked.get("gamma_graph", "case_gamma")),
                       tuple(int(v) for v in chunked.get("state_floats_per_image") or ()), str(chunked.get("scheme", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where} has an unreadable CaSE layout ({exc}); re-export with --adapter case") from None


@dataclass(frozen=True)
class Variant:
    """A file derived from one bundle graph for one engine or precision.

    Attributes:
        file: path relative to the bundle.
        graph: the bundle graph it was made from.
        kind: what the file is: "onnx" (a rewritten ONNX graph: INT8 QDQ, FP16 transform) or "trt" (a
            TensorRT plan); engines say which kinds they open.
        precision: fp32 | fp16 | int8 | ...
        graph_sha256: sha256 of the FP32 graph when the variant was made; a mismatch means stale.
        sha256: the variant file's own sha256.
        info: the kind's own record (the quantization report, the TensorRT engine record).
    """

    file: str
    graph: str
    kind: str
    precision: str
    graph_sha256: str
    sha256: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Variant:
        return cls(str(d["file"]), str(d["graph"]), str(d["kind"]), str(d["precision"]), str(d["graph_sha256"]),
                   str(d["sha256"]), dict(d.get("info") or {}))


@dataclass(frozen=True)
class BundleManifest:
    """Everything a device needs to know about a bundle, versioned by `schema`."""

    schema: int
    model: str  # timm name
    family: str
    adapter: str  # a registered adapter kind: none | case | toast | ...
    preprocess: Preprocess
    feature_dim: int
    opset: int
    graphs: dict[str, GraphInfo]
    files: dict[str, str]  # relative path -> sha256
    validation: dict[str, Any]  # CompareReport.to_dict(), or {"skipped": True}
    versions: dict[str, str]
    source: dict[str, Any]  # checkpoint path/sha, pretrained flag, adapter checkpoint, build options
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-specific records (CaseLayout, MACs, ...)
    variants: dict[str, Variant] = field(default_factory=dict)  # file -> record; see `record_variant`

    @property
    def bundle_id(self) -> str:
        """Identity of the graphs (not of later-added variants): task artefacts are tied to it."""
        graph_files = sorted((g.file, self.files[g.file]) for g in self.graphs.values())
        payload = json.dumps([self.model, self.adapter, graph_files], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def case_layout(self) -> CaseLayout:
        return CaseLayout.from_extra(self.extra, f"bundle of {self.model} (adapter {self.adapter})")

    def graph_sha256(self, graph: str) -> str:
        info = self.graphs.get(graph)
        return self.files.get(info.file, "") if info else ""

    def find_variants(self, graph: str | None = None, *, kind: str | None = None, precision: str | None = None) -> list[Variant]:
        """Variants matching every given field, in file order."""
        return [v for _, v in sorted(self.variants.items()) if (graph is None or v.graph == graph)
                and (kind is None or v.kind == kind) and (precision is None or v.precision == precision)]

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["graphs"] = {k: g.to_dict() for k, g in self.graphs.items()}
        d["variants"] = {k: v.to_dict() for k, v in self.variants.items()}
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BundleManifest:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError("the manifest is not a JSON object")
        for name, want in (("graphs", dict), ("files", dict), ("extra", dict), ("source", dict), ("versions", dict)):
            if name in d and not isinstance(d[name], want):
                raise TypeError(f"field {name!r} is a {type(d[name]).__name__}, not an object")
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        d["graphs"] = {k: GraphInfo.from_dict(g) for k, g in d["graphs"].items()}
        variants = {k: Variant.from_dict(v) for k, v in (d.pop("variants", None) or {}).items()}
        variants.update(_legacy_variants(d))
        return cls(**d, variants=variants)


def _legacy_variants(d: dict[str, Any]) -> dict[str, Variant]:
    """Variants of manifests written before `variants` existed: TensorRT `engines` and `extra["int8"]`."""
    out: dict[str, Variant] = {}
    files = d.get("files", {})
    for rel, rec in (d.pop("engines", None) or {}).items():
        out[rel] = Variant(rel, rec["graph"], "trt", rec["precision"], rec["graph_sha256"], rec["sha256"], dict(rec))
    extra = d.get("extra", {})
    int8 = extra.get(LEGACY_INT8_KEY) if isinstance(extra, dict) else None
    if isinstance(int8, dict) and "file" in int8:
        d["extra"] = {k: v for k, v in extra.items() if k != LEGACY_INT8_KEY}
        out[int8["file"]] = Variant(int8["file"], int8["graph"], "onnx", "int8", int8["source_sha256"],
                                    files.get(int8["file"], ""), dict(int8))
    return out
