"""fsdeploy: take few-shot image classifiers from research code to edge GPUs.

The Python API is three functions, the CLI's three steps (see `fsdeploy.api`):
`fsdeploy.export(model, out, ...)` -> Bundle, `fsdeploy.adapt(bundle, support, out, ...)` -> TaskArtefact,
`fsdeploy.predict(bundle, task, images, ...)` -> list of Prediction; `fsdeploy.Adapter(bundle, ...)` is a session
that adapts many tasks in one process with its engines kept warm. They are imported on first use, so
`import fsdeploy` stays light (no torch, no onnxruntime).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Adapter", "__version__", "adapt", "export", "predict"]

_API = ("export", "adapt", "predict", "Adapter")


def __getattr__(name: str) -> Any:
    if name in _API:
        from fsdeploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'fsdeploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
