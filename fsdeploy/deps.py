"""Lazy imports of optional or heavy packages, with an error that names the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from fsdeploy.errors import MissingDependency

# module name -> pip requirement that provides it
_PROVIDERS = {
    "onnxruntime": "'fsdeploy[cpu]' (onnxruntime; or 'fsdeploy[gpu]' for onnxruntime-gpu, never both)",
    "openvino": "'fsdeploy[openvino]' (openvino)",
    "onnx": "onnx",
    "torch": "torch",
    "timm": "timm",
    "tensorrt": "tensorrt",
    "tensorrt_rtx": "fsdeploy[tensorrt] (tensorrt-rtx)",
    "polygraphy": "fsdeploy[tensorrt] (polygraphy)",
    "matplotlib": "matplotlib",
    "onnxconverter_common": "onnxconverter-common",
}


def require(module: str) -> ModuleType:
    """Import `module` or raise MissingDependency naming what to pip install."""
    if module.split(".")[0] == "onnxruntime":
        from fsdeploy.engines.ort_dist import check_once

        check_once()  # two ONNX Runtime distributions shadow each other: refuse with the fix
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = _PROVIDERS.get(module.split(".")[0], module)
        raise MissingDependency(f"{module} is not installed ({exc}); run: pip install {what}") from exc


def available(module: str) -> bool:
    """True when `module` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
