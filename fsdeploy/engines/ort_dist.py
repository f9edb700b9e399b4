"""ONNX Runtime comes in one distribution per build (onnxruntime, onnxruntime-gpu, ...), all installing the
same `onnxruntime` package: with two installed, the last one pip wrote silently shadows files of the other
(e.g. a CPU-only build that still reports the GPU wheel's version). fsdeploy's extras install exactly one:
`fsdeploy[cpu]` (onnxruntime) or `fsdeploy[gpu]` (onnxruntime-gpu). This check runs before the first import.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from fsdeploy.errors import MissingDependency

# distributions that install the `onnxruntime` import package
DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn", "ort-nightly", "ort-nightly-gpu")


def installed_distributions(version: Callable[[str], str] | None = None) -> list[str]:
    """The ONNX Runtime distributions installed here, as `name==version`."""
    from importlib import metadata

    version = version or metadata.version
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append(f"{name}=={version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def check_single_distribution(version: Callable[[str], str] | None = None) -> None:
    """Raise when more than one ONNX Runtime distribution is installed.

    Raises:
        MissingDependency: two or more are installed; the message is the one-line fix.
    """
    found = installed_distributions(version)
    if len(found) > 1:
        names = " ".join(f.split("==")[0] for f in found)
        keep = "gpu" if any(f.startswith("onnxruntime-gpu==") for f in found) else "cpu"
        raise MissingDependency(
            f"{' and '.join(found)} are both installed and shadow each other's files; fix: pip uninstall -y {names} && "
            f"pip install 'fsdeploy[{keep}]' (fsdeploy[gpu] for CUDA, fsdeploy[cpu] otherwise)"
        )


@functools.lru_cache(maxsize=1)
def check_once() -> None:
    """`check_single_distribution` once per process (a failed check raises again on the next call)."""
    check_single_distribution()
