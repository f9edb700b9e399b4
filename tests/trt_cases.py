"""Shared by the TensorRT build tests: the (model, adapter) cases, building one, and the checks on it.

References are independent of the code under test: the FP16 ONNX transform is checked against the FP32
graph on ONNX Runtime with real photos, and the engines' recorded layer precisions are checked against the
ONNX graph's own op counts (every LayerNorm, Softmax and reduction must be an FP32 layer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from fsdeploy.data.samples import real_batch
from fsdeploy.deps import available
from fsdeploy.engines.build import build_bundle
from fsdeploy.engines.ort import OrtEngine, OrtOptions
from fsdeploy.engines.trt_backend import load_backend
from fsdeploy.engines.trt_records import PRECISIONS, BatchProfile, EngineRecord, engine_records
from fsdeploy.bundle import Bundle, load_bundle, resolve
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.adapters import ADAPTERS
from fsdeploy.exporters.rebuild import torch_graphs
from fsdeploy.compare import cosine
from tests.helpers import make_checkpoint

# Skips only off CI: on CI (CI=true) a missing TensorRT must fail, not hide every build test.
HAVE_TRT = available("polygraphy") and (available("tensorrt") or available("tensorrt_rtx"))
needs_trt = pytest.mark.skipif(
    not HAVE_TRT and not os.environ.get("CI"), reason="needs polygraphy and tensorrt or tensorrt-rtx: pip install fsdeploy[tensorrt]"
)

# (timm model, adapter): one entry per kind of graph `export` writes. An adapter not registered yet is
# skipped with a reason; once registered, its graphs must build or the test fails.
CASES = [
    ("resnet18", "none"),
    ("efficientnet_b0", "none"),
    ("vit_tiny_patch16_224", "none"),
    ("efficientnet_b0", "case"),
    ("vit_tiny_patch16_224", "toast"),
]
# The default suite builds one graph of each CaSE kind; `-m slow` builds the remaining stages too.
DEFAULT_GRAPHS = {"case": ("context", "query", "case_gamma", "stage_00")}
BATCH = BatchProfile(1, 2, 4)
# What must stay FP32 in an FP16 graph, stated here rather than read from the code under test.
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "GlobalAveragePool"}
MUST_STAY_FP32 = REDUCTIONS | {"LayerNormalization", "Softmax"}


@dataclass
class Built:
    bundle: Bundle
    graphs: tuple[str, ...]
    records: dict[str, dict[str, EngineRecord]]  # precision -> graph -> record
    bundle_id: str


def build_case(model: str, adapter: str, root: Path) -> Built:
    """Export `model` with `adapter` (realistic random weights, 32 px) and build its graphs FP32 and FP16."""
    if adapter not in ADAPTERS:
        pytest.skip(f"adapter {adapter!r} is not registered yet; its engine builds run once it is")
    ckpt = make_checkpoint(model, root / "weights.safetensors", img_size=32)
    bundle, _ = export_bundle(model, root / "bundle", adapter=adapter, checkpoint=ckpt, img_size=32, validate=False)
    graphs = DEFAULT_GRAPHS.get(adapter, tuple(bundle.manifest.graphs))
    records = {}
    for precision in PRECISIONS:
        recs = build_bundle(bundle, precision=precision, batch=BATCH, graphs=graphs, opt_level=0)
        records[precision] = {r.graph: r for r in recs}
    return Built(load_bundle(bundle.path), tuple(graphs), records, bundle.manifest.bundle_id)


def check_fp16_onnx_matches_fp32_on_real_images(built: Built) -> None:
    m = built.bundle.manifest
    images = real_batch(m.preprocess, 4, np.random.default_rng(1))
    modules = torch_graphs(built.bundle)
    cpu = OrtOptions(providers=("CPUExecutionProvider",))
    for g in built.graphs:
        feeds = modules[g].feeds(images)
        fp16_file = built.records["fp16"][g].source_onnx
        with OrtEngine(built.bundle.graph_path(g), cpu) as ref, OrtEngine(built.bundle.file(fp16_file), cpu) as half:
            want, got = ref.run(feeds), half.run(feeds)
        assert set(got) == set(want)
        for name, w in want.items():
            assert got[name].dtype == np.float32, f"{g}.{name}: the FP16 graph must keep FP32 outputs"
            assert float(np.abs(w).max()) > 1e-2, f"{g}.{name}: activations too small to test FP16 ({np.abs(w).max():.2e})"
            cos = cosine(got[name], w)
            assert cos >= 0.999, f"{g}.{name}: FP16 ONNX cosine {cos:.6f} < 0.999 against FP32"


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def check_fp16_graph_keeps_statistics_in_fp32(built: Built) -> None:
    for g in built.graphs:
        rec = built.records["fp16"][g]
        fp32 = onnx.load(str(built.bundle.graph_path(g)))
        half = onnx.load(str(built.bundle.file(rec.source_onnx)))
        types = _elem_types(half)
        kept = [n for n in half.graph.node if n.op_type in MUST_STAY_FP32]
        assert len(kept) == sum(n.op_type in MUST_STAY_FP32 for n in fp32.graph.node), f"{g}: FP32 ops lost in the transform"
        for node in kept:
            for name in [*node.input, *node.output]:
                if name and types.get(name) not in (None, onnx.TensorProto.INT64):
                    assert types[name] == onnx.TensorProto.FLOAT, f"{g}: {node.op_type} {node.name} reads/writes {name} in type {types[name]}"
        weights = [i for i in half.graph.initializer if len(i.dims) >= 2]
        assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights if not i.name.endswith("__fp32"))


def check_engines_are_listed_with_their_hashes(built: Built) -> None:
    bundle = load_bundle(built.bundle.path)  # verify=True: every engine and FP16 graph is hash-checked
    backend = load_backend()
    listed = engine_records(bundle.manifest)
    assert bundle.manifest.bundle_id == built.bundle_id, "engines must not change the bundle's identity"
    for precision in PRECISIONS:
        for g in built.graphs:
            rec = built.records[precision][g]
            info = bundle.manifest.graphs[g]
            graph_sha = bundle.manifest.files[info.file]
            assert listed[rec.file] == rec
            assert rec.file == f"engines/{g}-{graph_sha[:8]}-{backend.tag}-{precision}-{BATCH.tag}.engine"
            assert (rec.graph_sha256, rec.backend, rec.backend_version) == (graph_sha, backend.name, backend.version)
            assert bundle.manifest.files[rec.file] == rec.sha256
            assert rec.source_onnx == (info.file if precision == "fp32" else f"{Path(info.file).stem}.fp16.onnx")
            if precision == "fp16":  # the FP16 transform is recorded as the graph's fp16 variant, like INT8 and plans
                assert resolve(bundle, g, "fp16").path == bundle.file(rec.source_onnx)
            for name, spec in info.inputs.items():
                shapes = rec.input_shapes[name]
                for axis, dim in enumerate(spec.shape):
                    got = (shapes["min"][axis], shapes["opt"][axis], shapes["max"][axis])
                    assert got == (BATCH.as_tuple() if dim == "batch" else (dim, dim, dim)), f"{g}.{name} axis {axis}"


def check_layer_precisions_match_the_label(built: Built) -> None:
    for g in built.graphs:
        ops = [n.op_type for n in onnx.load(str(built.bundle.graph_path(g)), load_external_data=False).graph.node]
        fp32_rec, fp16_rec = built.records["fp32"][g], built.records["fp16"][g]
        assert fp32_rec.layer_precisions.get("fp32", 0) > 0 and fp32_rec.layer_precisions.get("fp16", 0) == 0
        assert fp16_rec.layer_precisions.get("fp16", 0) > 0, f"{g}: fp16 engine without FP16 layers"
        kinds = fp16_rec.fp32_layer_kinds
        assert kinds.get("NORMALIZATION", 0) == ops.count("LayerNormalization"), g
        assert kinds.get("SOFTMAX", 0) == ops.count("Softmax"), g
        assert kinds.get("REDUCE", 0) == sum(op in REDUCTIONS for op in ops), g
