"""What a TensorRT network or engine really computes in, counted layer by layer, and the label check.

TensorRT 11 (and TensorRT-RTX) take precision from the network's own types (strongly typed), not from a
builder flag, so a label such as `fp16` is only true if the layers say so: `network_precisions` counts the
parsed network before the build, `inspect_precisions` the built engine (with a GPU, read back through
`trt_backend.deserialize`), and `check_label` refuses an engine whose counts contradict its label.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from fsdeploy.engines.trt_backend import deserialize, load_backend
from fsdeploy.errors import EngineError

_TYPE_NAMES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "FP8": "fp8", "INT8": "int8"}


def network_precisions(network: Any, trt: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Compute layers of a parsed network by output type, and the kinds of those that are FP32.

    In a strongly typed network the builder must keep these types, so this is what the engine computes in.
    Shape arithmetic (integer outputs) and constants are not counted.
    """
    counts: Counter[str] = Counter()
    fp32_kinds: Counter[str] = Counter()
    skip = {trt.LayerType.SHAPE, trt.LayerType.CONSTANT}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in skip:
            continue
        types = [_TYPE_NAMES.get(layer.get_output_type(k).name) for k in range(layer.num_outputs)]
        label = next((t for t in types if t is not None), None)
        if label is None:
            continue
        counts[label] += 1
        if label == "fp32":
            fp32_kinds[layer.type.name] += 1
    return dict(counts), dict(fp32_kinds)


def _format_precision(fmt: str) -> str | None:
    """Precision named by an inspector 'Format/Datatype' string such as 'Channel major FP16 format ...'."""
    text = fmt.lower()
    for needle, label in (("bf16", "bf16"), ("fp16", "fp16"), ("half", "fp16"), ("fp8", "fp8"), ("int8", "int8"),
                          ("fp32", "fp32"), ("float", "fp32")):
        if needle in text:
            return label
    return None


def inspect_precisions(engine_bytes: bytes) -> dict[str, int]:
    """Layers of a serialized engine by output precision, read with IEngineInspector (needs a GPU).

    Engines built with detailed profiling verbosity (Polygraphy's default) list each layer's output format.
    TensorRT-RTX compiles most of a graph into fused nodes, so its counts are coarser than the network's.

    Raises:
        EngineError: no GPU, or the bytes are not a valid engine.
    """
    backend = load_backend()
    engine = deserialize(engine_bytes, backend)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(backend.trt.LayerInformationFormat.JSON))
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):  # names only: the engine was built without detailed verbosity
            continue
        outputs = layer.get("Outputs") or []
        label = _format_precision(str(outputs[0].get("Format/Datatype", ""))) if outputs else None
        if label is not None:
            counts[label] += 1
    return dict(counts)


def check_label(precision: str, counts: dict[str, int], name: str) -> None:
    """Never label an engine with a precision its layers do not have."""
    if precision == "fp16" and counts.get("fp16", 0) == 0:
        raise EngineError(
            f"{name}: asked for fp16 but the network has no FP16 layers; build from the FP16 transform "
            "(fsdeploy.engines.onnx_fp16.fp16_onnx), as `fsdeploy build --precision fp16` does"
        )
    if precision == "fp32" and any(counts.get(k, 0) for k in ("fp16", "bf16", "fp8", "int8")):
        raise EngineError(f"{name}: asked for fp32 but the network has reduced-precision layers {counts}; build from the FP32 graph")
