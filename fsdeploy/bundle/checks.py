"""Shape checks on a parsed manifest.json, so a hand-edited or foreign manifest gives one line naming the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fsdeploy.errors import BundleError

# top-level field -> the JSON type it must have
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema": int, "model": str, "family": str, "adapter": str, "preprocess": dict, "feature_dim": int, "opset": int,
    "graphs": dict, "files": dict, "validation": dict, "versions": dict, "source": dict, "extra": dict, "engines": dict,
    "variants": dict,
}
OPTIONAL = {"extra", "engines", "variants"}  # engines: manifests written before variants
_JSON_NAMES = {int: "a number", str: "a string", dict: "an object {...}", list: "a list"}


def check_manifest_shape(d: Any, path: Path) -> None:
    """Raise BundleError naming the first field of `d` (parsed `path`) with a missing or wrong-typed value.

    Raises:
        BundleError: not an object, a required field missing, a field of the wrong JSON type, or a graph /
            file entry of the wrong shape.
    """
    fix = "re-export the bundle (`fsdeploy export ... --force`)"
    if not isinstance(d, dict):
        raise BundleError(f"{path} is not a JSON object; {fix}")
    for name, want in FIELD_TYPES.items():
        if name not in d:
            if name in OPTIONAL:
                continue
            raise BundleError(f"{path} has no {name!r} field; {fix}")
        value = d[name]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise BundleError(f"{path}: {name!r} must be {_JSON_NAMES[want]}, not {type(value).__name__} {str(value)[:40]}; {fix}")
    for rel, digest in d["files"].items():
        if not isinstance(digest, str):
            raise BundleError(f"{path}: files[{rel!r}] must be a sha256 string; {fix}")
    for name, g in d["graphs"].items():
        if not isinstance(g, dict) or not isinstance(g.get("file"), str) or not all(
            isinstance(g.get(k), dict) for k in ("inputs", "outputs")
        ):
            raise BundleError(f"{path}: graphs[{name!r}] must be an object with file, inputs and outputs; {fix}")
