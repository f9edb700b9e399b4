"""A CaSE query graph whose γ input has the batch dimension, so requests of different tasks batch together.

Triton's dynamic batcher only merges requests when every input has the batch dimension. The bundle's
`query` graph takes one γ `(G,)` for the whole batch; each CaSE site reads its slice of γ with a `Slice`
on axis 0 and reshapes it to `(1, C, 1, 1)` (or `(1, C)`) before a `Mul`. The batched variant slices on
axis 1 of a `(N, G)` γ and reshapes to `(0, C, 1, 1)` (0: keep the slice's N), so row n scales image n by its own task's γ.
Nothing else changes; `validate_batched` checks the variant against the bundle's graph row by row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.errors import BundleError


@dataclass(frozen=True)
class BatchedCheck:
    """Batched-γ graph against the bundle's query graph, one task per row."""

    rows: int
    tasks: int
    max_abs: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.atol

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "tasks": self.tasks, "max_abs": self.max_abs, "atol": self.atol, "passed": self.passed}


def _const(model: Any, name: str) -> np.ndarray | None:
    """Value of a Constant node output or an initializer, or None."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def batched_gamma_graph(query_onnx: str | Path, gamma_name: str = "gamma") -> bytes:
    """Rewrite the bundle's CaSE query graph so that γ is `(batch, G)`.

    Raises:
        BundleError: γ is consumed by something other than the Slice → Reshape pattern the CaSE export
            writes (the graph came from another exporter); re-export the bundle.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(query_onnx))
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if gamma_name not in inputs:
        raise BundleError(f"{query_onnx} has no input {gamma_name!r}; is this a CaSE query graph? re-export with --adapter case")
    dims = inputs[gamma_name].type.tensor_type.shape.dim
    if len(dims) != 1:
        raise BundleError(f"{query_onnx}: {gamma_name} has {len(dims)} dims, expected 1 (G,); re-export the bundle")
    batch_dim = inputs["images"].type.tensor_type.shape.dim[0]
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    fix = "re-export the bundle with `fsdeploy export MODEL --adapter case`"
    new_inits = []
    axis1 = "fsdeploy_batched_gamma_axis1"
    new_inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axis1))
    for k, node in enumerate(consumers.get(gamma_name, [])):
        if node.op_type != "Slice" or len(node.input) < 4 or node.input[0] != gamma_name:
            raise BundleError(f"{query_onnx}: γ feeds a {node.op_type} node {node.name!r}, not a Slice on axis 0; {fix}")
        axes = _const(model, node.input[3])
        if axes is None or axes.tolist() not in ([0], [-1]):
            raise BundleError(f"{query_onnx}: Slice {node.name!r} on γ has axes {axes}, expected [0]; {fix}")
        node.input[3] = axis1
        for reshape in consumers.get(node.output[0], []):
            if reshape.op_type != "Reshape":
                raise BundleError(f"{query_onnx}: a γ slice feeds {reshape.op_type} {reshape.name!r}, not a Reshape; {fix}")
            shape = _const(model, reshape.input[1])
            if shape is None or shape.ndim != 1 or shape.shape[0] < 2 or int(shape[0]) != 1:
                raise BundleError(f"{query_onnx}: Reshape {reshape.name!r} of a γ slice has shape {shape}, expected (1, C, ...); {fix}")
            if any(a.name == "allowzero" and a.i == 1 for a in reshape.attribute):
                raise BundleError(f"{query_onnx}: Reshape {reshape.name!r} has allowzero=1; {fix}")
            batched = shape.astype(np.int64).copy()
            batched[0] = 0  # 0 = copy the slice's dim 0: one γ row per image (a second -1 is not allowed)
            name = f"fsdeploy_batched_gamma_shape_{k}_{reshape.name.strip('/').replace('/', '_')}"
            new_inits.append(numpy_helper.from_array(batched, name))
            reshape.input[1] = name
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Constant" and not any(o in used for o in n.output)]
    for node in dead:  # the axis-0 and (1, C, ...) constants the rewrite replaced
        graph.node.remove(node)
    # the new γ input: (batch, G), with the same batch dimension as the images
    g_size = dims[0].dim_value
    new_input = helper.make_tensor_value_info(gamma_name, onnx.TensorProto.FLOAT, [batch_dim.dim_param or "batch", g_size])
    idx = [i for i, x in enumerate(graph.input) if x.name == gamma_name][0]
    graph.input.remove(graph.input[idx])
    graph.input.insert(idx, new_input)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def validate_batched(
    query_onnx: str | Path, batched: bytes, image_shape: tuple[int, int, int], gammas: np.ndarray, *,
    rows_per_task: int = 2, atol: float = 1e-5, seed: int = 0,
) -> BatchedCheck:
    """Run the batched graph on images of several tasks at once and compare every row with the bundle's query
    graph run on that row's task alone (ONNX Runtime CPU, both).

    Args:
        gammas: `(T, G)` γ of T tasks (e.g. the repository's tasks, or perturbed identities).
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    t = gammas.shape[0]
    images = rng.standard_normal((t * rows_per_task, *image_shape)).astype(np.float32)
    rows_gamma = np.repeat(gammas.astype(np.float32), rows_per_task, axis=0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ref_sess = ort.InferenceSession(str(query_onnx), opts, providers=["CPUExecutionProvider"])
    new_sess = ort.InferenceSession(batched, opts, providers=["CPUExecutionProvider"])
    # shuffle rows so that neighbouring rows belong to different tasks
    order = rng.permutation(len(images))
    got = new_sess.run(["features"], {"images": images[order], "gamma": rows_gamma[order]})[0]
    worst = 0.0
    for task in range(t):
        sel = slice(task * rows_per_task, (task + 1) * rows_per_task)
        ref = ref_sess.run(["features"], {"images": images[sel], "gamma": gammas[task].astype(np.float32)})[0]
        pos = np.argsort(order)[sel]
        worst = max(worst, float(np.abs(got[pos] - ref).max()))
    return BatchedCheck(rows=len(images), tasks=t, max_abs=worst, atol=atol)
