"""The bundle layer: typed manifest records, the hash-checked folder, and resolving a graph to a source.

It sits below `exporters` (which write bundles) and `engines` (which open what `resolve` returns), and
imports neither (Polygraphy's split between loaders and runners).
"""
from __future__ import annotations

from fsdeploy.bundle.folder import (
    MANIFEST,
    TORCH_WEIGHTS,
    Bundle,
    add_files,
    checked_sha256,
    hash_files,
    load_bundle,
    manifest_lock,
    record_variant,
    update_manifest,
    write_manifest,
)
from fsdeploy.bundle.manifest import SCHEMA, BundleManifest, CaseLayout, GammaSlice, GraphInfo, TensorSpec, Variant
from fsdeploy.bundle.sources import GraphSource, TorchModule, resolve

__all__ = [
    "MANIFEST", "SCHEMA", "TORCH_WEIGHTS", "Bundle", "BundleManifest", "CaseLayout", "GammaSlice", "GraphInfo",
    "GraphSource", "TensorSpec", "TorchModule", "Variant", "add_files", "checked_sha256", "hash_files",
    "load_bundle", "manifest_lock", "record_variant", "resolve", "update_manifest", "write_manifest",
]
