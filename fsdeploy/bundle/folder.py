"""The bundle folder: ONNX graphs, the PyTorch reference weights and a versioned, hash-checked manifest.

`manifest.json` lists every file with its sha256; `load_bundle` checks the schema and every hash before
use, so a bundle edited by hand or half-copied is refused rather than silently used. Every change to a
manifest after export goes through `update_manifest`, which holds a lock on the folder across its
read-modify-write, so two writers (`fsdeploy build` and `fsdeploy quantize` at once) never lose a record.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fsdeploy.atomic import sha256_file, write_text
from fsdeploy.bundle.checks import check_manifest_shape
from fsdeploy.bundle.manifest import SCHEMA, BundleManifest, Variant
from fsdeploy.errors import BundleError

MANIFEST = "manifest.json"
TORCH_WEIGHTS = "torch.safetensors"


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
    """Atomically (re)write `folder/manifest.json` (export only; later changes use `update_manifest`)."""
    write_text(folder / MANIFEST, manifest.to_json())


def hash_files(folder: Path, rels: Iterable[str]) -> dict[str, str]:
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


def read_manifest(path: Path) -> BundleManifest:
    """Parse `path/manifest.json` without checking files.

    Raises:
        BundleError: no manifest, an unreadable one, or another schema.
    """
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
    return manifest


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check a bundle.

    Raises:
        BundleError: no manifest, unknown schema, a listed file missing, or a hash mismatch.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        for rel, digest in manifest.files.items():
            variant = manifest.variants.get(rel)
            if variant is not None and variant.kind == "trt":
                continue  # a plan's hash is checked when it is selected, so a bad one never blocks the CPU engines
            f = path / rel
            fix = ("re-run `fsdeploy quantize` (or remove it with a re-export)" if variant is not None and variant.precision == "int8"
                   else "rebuild it with `fsdeploy build`" if rel.startswith("engines/") or variant is not None else "re-export the bundle")
            if not f.is_file():
                raise BundleError(f"bundle {path} is missing {rel}; {fix}")
            if sha256_file(f) != digest:
                raise BundleError(f"{f} does not match the sha256 in {path / MANIFEST}; the file changed since it was written — {fix}")
    return Bundle(path, manifest)


@contextlib.contextmanager
def manifest_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the bundle's manifest: a flock on the bundle folder itself, so no lock file is
    left behind; the kernel releases it when the holder exits or dies."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def update_manifest(bundle: Bundle | str | Path, change: Callable[[BundleManifest], BundleManifest]) -> Bundle:
    """Re-read the manifest under the lock, apply `change`, write it atomically; the new Bundle.

    `change` sees the manifest as it is on disk now (another writer may have added records since this
    process loaded it), so concurrent writers each keep the other's records.
    """
    path = bundle.path if isinstance(bundle, Bundle) else Path(bundle)
    with manifest_lock(path):
        manifest = change(read_manifest(path))
        write_manifest(path, manifest)
    return Bundle(path, manifest)


def add_files(bundle: Bundle, rels: list[str], **changes: Any) -> Bundle:
    """Record new files (hashes computed now) and other manifest changes, rewriting the manifest atomically."""
    digests = hash_files(bundle.path, rels)
    return update_manifest(bundle, lambda m: replace(m, files={**m.files, **digests}, **changes))


def record_variant(bundle: Bundle, variant: Variant, *, supersedes: Callable[[Variant], bool] | None = None,
                   extra_files: dict[str, str] | None = None) -> tuple[Bundle, list[str]]:
    """List `variant` (its file already in the bundle folder) in the manifest: the one way any engine file,
    INT8 or FP16 graph is recorded.

    Args:
        supersedes: variants this one replaces (dropped from the manifest; their files are returned for the
            caller to delete once the new manifest is written).
        extra_files: other files to list with their sha256 (e.g. the FP16 graph a TensorRT plan was built from).

    Returns:
        The updated bundle and the files of superseded variants no longer listed.
    """
    dropped: list[str] = []

    def change(m: BundleManifest) -> BundleManifest:
        variants = dict(m.variants)
        files = dict(m.files)
        for rel, old in m.variants.items():
            if rel == variant.file or supersedes is not None and supersedes(old):
                variants.pop(rel)
                files.pop(rel, None)
                if rel != variant.file:
                    dropped.append(rel)
        variants[variant.file] = variant
        files[variant.file] = variant.sha256
        files.update(extra_files or {})
        return replace(m, variants=variants, files=files)

    return update_manifest(bundle, change), dropped
