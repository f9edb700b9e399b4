"""FP16 as an ONNX transform, done before the TensorRT build.

Mixed precision after Micikevicius et al., "Mixed Precision Training", ICLR 2018: weights and most
activations in FP16, while ops that accumulate statistics over many values (normalisation, softmax,
reductions, and CaSE's context pooling) stay in FP32, where FP16's 10-bit mantissa would lose the sum.

Doing it on the graph rather than with a builder flag means the engine's types are fixed by the ONNX file:
TensorRT 11 and TensorRT-RTX build strongly typed networks (no FP16 flag exists), and TensorRT 10 builds
the same file. The converter is onnxconverter-common's `float16` (pure Python, already a dependency, runs on
CPU CI). NVIDIA Model Optimizer's AutoCast was not chosen: its `[onnx]` extra pins onnx ~1.21 and, on
x86 Linux, onnxruntime-gpu and cupy, which would replace the CPU onnxruntime the rest of fsdeploy uses.

Four graph fixes run first because the converter mistypes them (ONNX Runtime then refuses the model):
Identity nodes that only alias an initializer, initializers read both by a kept-FP32 op and an FP16 op,
graph outputs that other nodes also read (CaSE stages), and existing Cast-to-float nodes (kept as they are).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from fsdeploy.atomic import atomic_path
from fsdeploy.deps import require
from fsdeploy.errors import EngineError, InvalidInput

# Ops whose inputs and outputs stay FP32: statistics over many values.
FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "GlobalAveragePool",
)
_FLOAT = 1  # onnx.TensorProto.FLOAT


def fp32_op_list() -> list[str]:
    """`FP32_OPS` plus the ops the converter cannot run in FP16 at all (its own default block list)."""
    float16 = require("onnxconverter_common").float16
    return sorted(set(FP32_OPS) | set(float16.DEFAULT_OP_BLOCK_LIST))


def _alias_identity_initializers(graph: Any) -> None:
    """Let consumers read an initializer directly instead of through an Identity (exporters add these for
    tied or deduplicated weights; the converter casts the initializer but leaves the Identity typed FP32)."""
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not alias:
        return
    for node in keep:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _split_mixed_initializers(graph: Any, fp32_ops: set[str]) -> None:
    """Give kept-FP32 ops their own copy of an initializer that FP16 ops also read."""
    onnx = require("onnx")
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in inits:
                users.setdefault(name, []).append((node, k))
    for name, uses in users.items():
        if len({n.op_type in fp32_ops for n, _ in uses}) < 2:
            continue
        copy_name = f"{name}__fp32"
        if copy_name not in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = copy_name
            graph.initializer.append(copy)
            inits[copy_name] = copy
        for node, k in uses:
            if node.op_type in fp32_ops:
                node.input[k] = copy_name


def _isolate_graph_outputs(graph: Any, fp32_ops: set[str]) -> list[str]:
    """Produce each graph output through its own Identity, so nodes that also read it keep an internal tensor.

    Returns the names of Identities that must stay FP32 (their producer is a kept-FP32 op, e.g. CaSE's pooled
    means), so such an output is never rounded through FP16 on its way out.
    """
    onnx = require("onnx")
    outputs = {o.name for o in graph.output}
    producer = {out: n for n in graph.node for out in n.output}
    keep_fp32: list[str] = []
    for name in outputs:
        node = producer.get(name)
        if node is None:  # an input or initializer passed straight through
            continue
        inner = f"{name}__inner"
        node.output[list(node.output).index(name)] = inner
        for other in graph.node:
            for k, used in enumerate(other.input):
                if used == name:
                    other.input[k] = inner
        ident = onnx.helper.make_node("Identity", [inner], [name], name=f"{name}__output")
        graph.node.append(ident)
        if node.op_type in fp32_ops:
            keep_fp32.append(ident.name)
    return keep_fp32


def _restore_output_types(graph: Any, want: dict[str, int]) -> None:
    """Make every graph output keep its original type: the converter rounds an output produced by a kept-FP32
    node through a Cast to FP16; that Cast is turned back into a Cast to the original type."""
    onnx = require("onnx")
    producer = {out: n for n in graph.node for out in n.output}
    for out in graph.output:
        tt = out.type.tensor_type
        if tt.elem_type == want.get(out.name, tt.elem_type):
            continue
        node = producer.get(out.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = want[out.name]
        else:
            inner = f"{out.name}__fp16"
            if node is not None:
                node.output[list(node.output).index(out.name)] = inner
            graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=want[out.name], name=f"{out.name}__cast"))
        tt.elem_type = want[out.name]


def fp16_model(model: Any) -> Any:
    """Return an FP16 copy of an in-memory ONNX model; inputs/outputs stay FP32, `FP32_OPS` run in FP32."""
    onnx = require("onnx")
    float16 = require("onnxconverter_common").float16
    work = onnx.ModelProto()
    work.CopyFrom(model)
    block = fp32_op_list()
    _alias_identity_initializers(work.graph)
    _split_mixed_initializers(work.graph, set(block))
    kept_outputs = _isolate_graph_outputs(work.graph, set(block))
    del work.graph.value_info[:]  # exporter type annotations would contradict the converted graph
    float_casts = [
        n.name for n in work.graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i == _FLOAT for a in n.attribute)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per clamped tiny weight; the numeric checks judge the result
        out = float16.convert_float_to_float16(
            work, keep_io_types=True, op_block_list=block, node_block_list=float_casts + kept_outputs
        )
    _restore_output_types(out.graph, {o.name: o.type.tensor_type.elem_type for o in model.graph.output})
    return out


def fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """Write an FP16 version of the ONNX graph `src` to `dst` (atomically) and return `dst`.

    Graph inputs and outputs stay FP32, so callers feed and read the same arrays as before.

    Raises:
        InvalidInput: `src` is missing or not an ONNX model.
        EngineError: the converted graph fails ONNX type checking (build with --precision fp32 instead).
    """
    onnx = require("onnx")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InvalidInput(f"{src} does not exist; pass an ONNX graph from a bundle")
    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise InvalidInput(f"{src} is not an ONNX model ({type(exc).__name__}); re-export the bundle") from None
    converted = fp16_model(model)
    try:
        onnx.checker.check_model(converted)
        onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"the FP16 transform of {src.name} is not a valid graph ({first}); build it with --precision fp32") from None
    io_before = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    io_after = {v.name: v.type.tensor_type.elem_type for v in [*converted.graph.input, *converted.graph.output]}
    if io_before != io_after:
        changed = sorted(k for k in io_before if io_before[k] != io_after.get(k))
        raise EngineError(f"the FP16 transform of {src.name} changed the type of {', '.join(changed)}; build it with --precision fp32")
    with atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(converted, str(tmp))
    return dst


def onnx_float_types(path: str | Path) -> dict[str, int]:
    """Count the graph's float initializers by precision (`fp16` / `fp32`): a cheap look at what a file holds."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_type in names:
            key = names[init.data_type]
            counts[key] = counts.get(key, 0) + 1
    return counts
