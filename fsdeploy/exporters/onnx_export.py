"""torch.nn.Module -> ONNX file, atomically, with the names and dynamic axes of an ExportSpec."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from fsdeploy.atomic import atomic_path
from fsdeploy.deps import require
from fsdeploy.errors import FsdeployError
from fsdeploy.exporters.spec import ExportSpec


def export_onnx(module: Any, example: tuple[Any, ...], path: str | Path, spec: ExportSpec) -> Path:
    """Export `module(*example)` to `path` and check the file with onnx.checker.

    Raises:
        FsdeployError: the exporter failed (the message names the module and the first line of the cause).
    """
    torch = require("torch")
    onnx = require("onnx")
    path = Path(path)
    input_names = list(spec.inputs)
    dynamic_axes = {**{k: v for k, v in spec.inputs.items() if v}, **spec.output_axes}
    with atomic_path(path, suffix=".onnx") as tmp:
        try:
            with warnings.catch_warnings():
                # the TorchScript exporter announces its deprecation on every call; the choice is ours (spec.dynamo)
                warnings.simplefilter("ignore", category=DeprecationWarning)
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                with torch.no_grad():
                    if spec.dynamo:
                        dims = {
                            n: {a: torch.export.Dim(d, min=1) for a, d in axes.items()} for n, axes in spec.inputs.items()
                        }
                        torch.onnx.export(
                            module, example, str(tmp), input_names=input_names, output_names=list(spec.outputs),
                            dynamic_shapes=tuple(dims[n] or None for n in input_names), opset_version=max(spec.opset, 18),
                            dynamo=True, verbose=False,
                        )
                    else:
                        torch.onnx.export(
                            module, example, str(tmp), input_names=input_names, output_names=list(spec.outputs),
                            dynamic_axes=dynamic_axes, opset_version=spec.opset, do_constant_folding=True, dynamo=False,
                        )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise FsdeployError(f"ONNX export of {type(module).__name__} failed: {type(exc).__name__}: {first}") from exc
        onnx.checker.check_model(str(tmp))
    return path
