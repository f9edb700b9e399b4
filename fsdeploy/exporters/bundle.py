"""The bundle: a folder with ONNX graphs, the PyTorch reference weights and a versioned manifest.

`manifest.json` lists every file with its sha256; `load_bundle` checks the schema and every hash before
use, so a bundle edited by hand or half-copied is refused rather than silently used.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fsdeploy.atomic import sha256_file, write_text
from fsdeploy.backbones import Preprocess
from fsdeploy.engines.base import TensorSpec
from fsdeploy.errors import BundleError
from fsdeploy.manifest_checks import check_manifest_shape

SCHEMA = 1
MANIFEST = "manifest.json"
TORCH_WEIGHTS = "torch.safetensors"


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
class BundleManifest:
    """Everything a device needs to know about a bundle, versioned by `schema`."""

    schema: int
    model: str  # timm name
    family: str
    adapter: str  # none | case | toast | ...
    preprocess: Preprocess
    feature_dim: int
    opset: int
    graphs: dict[str, GraphInfo]
    files: dict[str, str]  # relative path -> sha256
    validation: dict[str, Any]  # ValidationReport.to_dict(), or {"skipped": True}
    versions: dict[str, str]
    source: dict[str, Any]  # checkpoint path/sha, pretrained flag, adapter checkpoint
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-specific: gamma layout, MACs, ...
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by `fsdeploy build`

    @property
    def bundle_id(self) -> str:
        """Identity of the graphs (not of later-added engines): task artefacts are tied to it."""
        graph_files = sorted((g.file, self.files[g.file]) for g in self.graphs.values())
        payload = json.dumps([self.model, self.adapter, graph_files], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["graphs"] = {k: g.to_dict() for k, g in self.graphs.items()}
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BundleManifest:
        d = json.loads(text)
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        d["graphs"] = {k: GraphInfo.from_dict(g) for k, g in d["graphs"].items()}
        return cls(**d)


@dataclass(frozen=True)
class Bundle:
    """A loaded, hash-checked bundle folder."""

    path: Path
    manifest: BundleManifest

    def graph_path(self, name: str) -> Path:
        if name not in self.manifest.graphs:
            raise BundleError(
                f"bundle {self.path} has no graph {name!r}; it has {', '.join(sorted(self.manifest.graphs))}"
            )
        return self.path / self.manifest.graphs[name].file

    def file(self, rel: str) -> Path:
        return self.path / rel


def write_manifest(folder: Path, manifest: BundleManifest) -> None:
    """Atomically (re)write `folder/manifest.json`."""
    write_text(folder / MANIFEST, manifest.to_json())


def hash_files(folder: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of each relative path under `folder`."""
    return {rel: sha256_file(folder / rel) for rel in rels}


def checked_sha256(bundle: Bundle, rel: str) -> str:
    """sha256 of a bundle file, which must still be the one the manifest lists (for callers that read a
    graph again after `load_bundle`, or loaded with verify=False).

    Raises:
        BundleError: the file changed since it was written.
    """
    digest = sha256_file(bundle.file(rel))
    if bundle.manifest.files.get(rel) != digest:
        raise BundleError(f"{bundle.file(rel)} does not match the sha256 in the manifest; the graph changed since export — re-export the bundle")
    return digest


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check a bundle.

    Raises:
        BundleError: no manifest, unknown schema, a listed file missing, or a hash mismatch.
    """
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle (no {MANIFEST}); create one with `fsdeploy export MODEL --out {path}`")
    try:
        text = mf.read_text()
        check_manifest_shape(json.loads(text), mf)
        manifest = BundleManifest.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{mf} is not a valid fsdeploy manifest ({type(exc).__name__}: {exc}); re-export the bundle") from None
    if manifest.schema != SCHEMA:
        raise BundleError(f"{mf} has schema {manifest.schema}; this fsdeploy reads schema {SCHEMA}; re-export the bundle")
    if verify:
        for rel, digest in manifest.files.items():
            if rel in manifest.engines:
                continue  # an engine's hash is checked when it is selected, so a bad one never blocks the CPU engines
            f = path / rel
            int8 = manifest.extra.get("int8", {}).get("file") if isinstance(manifest.extra.get("int8"), dict) else None
            fix = "re-run `fsdeploy quantize` (or remove it with a re-export)" if rel == int8 else (
                "rebuild it with `fsdeploy build`" if rel.startswith("engines/") else "re-export the bundle")
            if not f.is_file():
                raise BundleError(f"bundle {path} is missing {rel}; {fix}")
            if sha256_file(f) != digest:
                raise BundleError(f"{f} does not match the sha256 in {mf}; the file changed since it was written — {fix}")
    return Bundle(path, manifest)


def add_files(bundle: Bundle, rels: list[str], **changes: Any) -> Bundle:
    """Record new files (hashes computed now) and other manifest changes, rewriting the manifest atomically."""
    files = {**bundle.manifest.files, **hash_files(bundle.path, rels)}
    manifest = replace(bundle.manifest, files=files, **changes)
    write_manifest(bundle.path, manifest)
    return Bundle(bundle.path, manifest)
