"""config.pbtxt text for every model of the repository (Triton's ModelConfig in protobuf text format).

Plain functions of typed values: the repository writer calls them and tests read their text back.
Shapes leave out the batch dimension (Triton adds it when `max_batch_size` > 0).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

BACKENDS = ("python", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton type without the TYPE_ prefix: FP32, STRING, INT64
    dims: tuple[int, ...]
    optional: bool = False

    def text(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        opt = " optional: true" if self.optional else ""
        return f'  {{ name: "{self.name}" data_type: TYPE_{self.dtype} dims: [ {dims} ]{opt} }}'


@dataclass(frozen=True)
class ModelSpec:
    """One model's config."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch: int
    backend: str = "python"  # python | onnxruntime | tensorrt | ensemble
    device: str = "cpu"
    instances: int = 1
    queue_delay_us: int | None = None  # dynamic batching when set
    params: dict[str, str] = field(default_factory=dict)
    steps: tuple[str, ...] = ()  # ensemble steps, already rendered


def _io(key: str, tensors: Sequence[Tensor]) -> str:
    return f"{key} [\n" + ",\n".join(t.text() for t in tensors) + "\n]"


def _accelerator(backend: str, device: str) -> str:
    """ONNX Runtime's execution accelerators: TensorRT FP16 on a GPU, OpenVINO on a CPU."""
    if backend != "onnxruntime":
        return ""
    if device == "gpu":
        return (
            "optimization { execution_accelerators {\n"
            "  gpu_execution_accelerator : [ {\n"
            '    name : "tensorrt"\n'
            '    parameters { key: "precision_mode" value: "FP16" }\n'
            '    parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            '    parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            "  } ]\n"
            "} }"
        )
    return 'optimization { execution_accelerators {\n  cpu_execution_accelerator : [ { name : "openvino" } ]\n} }'


def render(spec: ModelSpec) -> str:
    """The config.pbtxt text of `spec`."""
    lines = [f'name: "{spec.name}"']
    if spec.backend == "ensemble":
        lines.append('platform: "ensemble"')
    elif spec.backend == "onnxruntime":
        lines.append('platform: "onnxruntime_onnx"')
    elif spec.backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append(f'backend: "{spec.backend}"')
    lines.append(f"max_batch_size: {spec.max_batch}")
    lines.append(_io("input", spec.inputs))
    lines.append(_io("output", spec.outputs))
    if spec.backend == "ensemble":
        lines.append("ensemble_scheduling {\n  step [\n" + ",\n".join(spec.steps) + "\n  ]\n}")
        return "\n".join(lines) + "\n"
    if spec.queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {spec.queue_delay_us} }}")
    kind = "KIND_GPU" if spec.device == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [ {{ kind: {kind} count: {spec.instances} }} ]")
    acc = _accelerator(spec.backend, spec.device)
    if acc:
        lines.append(acc)
    for key, value in spec.params.items():
        lines.append(f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """One ensemble step: `inputs` maps the model's input names to ensemble tensors, `outputs` likewise."""
    maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"
