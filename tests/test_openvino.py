"""OpenVINO engine: outputs equal ONNX Runtime FP32 within each precision's tolerance on real images.

The reference is a plain onnxruntime session (independent of fsdeploy's engines) on matplotlib's sample
photos and rendered glyphs; plain, CaSE (γ input, stage chain through run_into) and a folded task graph.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openvino")

from fsdeploy.data.folders import list_images
from fsdeploy.data.images import load_checked
from fsdeploy.engines import EngineOptions
from fsdeploy.runtime import open_graph
from fsdeploy.engines.openvino import OpenVinoEngine, OpenVinoOptions, cache_dir, compile_config, hint_for_batch
from fsdeploy.errors import BundleError, EngineError, InvalidInput, UnknownName
from fsdeploy.bundle import load_bundle
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.runtime.case_pass import context_pass, query_pass
from tests.helpers import glyph_folder

# Tolerances against ORT FP32, relative to max |FP32 feature| (max_abs) and per-image cosine. FP32 differs
# from ORT by kernel order only (measured ~1e-6 relative); bf16 keeps 8 mantissa bits per product (measured
# 0.6% of max |feature| on these graphs); int8 follows test_quantize's bound on the same graphs.
TOLERANCE = {"fp32": (1e-4, 0.99999), "bf16": (0.05, 0.995), "int8": (0.25, 0.98)}


def _bf16_here() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _ort(onnx: Path | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx if isinstance(onnx, bytes) else str(onnx), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _close(got: np.ndarray, ref: np.ndarray, precision: str) -> None:
    rel, min_cos = TOLERANCE[precision]
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= rel * scale, f"{precision}: max |diff| {np.abs(got - ref).max():.3g} vs {rel * scale:.3g}"
    a, b = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= min_cos, f"{precision}: per-image cosine {cos.min():.5f} < {min_cos}"


@pytest.fixture(scope="module")
def ws(int8_resnet18):
    plain = int8_resnet18.bundle
    images = load_checked(list_images([int8_resnet18.photos]), plain.manifest.preprocess)
    return SimpleNamespace(plain=plain, photos=int8_resnet18.photos, images=images, glyphs=int8_resnet18.glyphs)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_plain_features_follow_ort_fp32(ws, precision: str) -> None:
    if precision == "bf16" and not _bf16_here():
        with pytest.raises(UnknownName, match="no bf16 support"):
            open_graph(ws.plain, "features", "openvino", EngineOptions(precision="bf16"))
        return
    ref = _ort(ws.plain.graph_path("features"), {"images": ws.images})["features"]
    with open_graph(ws.plain, "features", "openvino", EngineOptions(precision=precision)) as eng:
        got = eng.run({"images": ws.images})["features"]
        assert eng.input_specs()["images"].shape == ("batch", 3, 32, 32)
    _close(got, ref, precision)
    if precision != "fp32":  # the lower precision really ran: outside FP32's tolerance
        assert np.abs(got - ref).max() > TOLERANCE["fp32"][0] * np.abs(ref).max()


@pytest.mark.parametrize(("precision", "kernel"), [("fp32", "f32"), ("bf16", "bf16"), ("int8", "u8")])
def test_every_conv_runs_at_the_requested_precision(ws, precision: str, kernel: str) -> None:
    """Read back from the compiled model: the hint was honoured, no conv silently left at another type."""
    if precision == "bf16" and not _bf16_here():
        return  # test_plain_features_follow_ort_fp32 checks the refusal on such CPUs
    with open_graph(ws.plain, "features", "openvino", EngineOptions(precision=precision)) as eng:
        counts = eng.kernel_precisions()
    import onnx

    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(ws.plain.graph_path("features"))).graph.node)
    assert counts.get(f"Convolution {kernel}") == n_conv, counts


def test_throughput_hint_splits_batches_exactly(ws) -> None:
    ref = _ort(ws.plain.graph_path("features"), {"images": ws.images})["features"]
    eng = OpenVinoEngine(ws.plain.graph_path("features"), OpenVinoOptions(hint="throughput", threads=2))
    out = np.full_like(ref, np.nan)
    eng.run_into({"images": ws.images}, {"features": out})
    _close(out, ref, "fp32")
    _close(eng.run({"images": ws.images})["features"], ref, "fp32")
    assert hint_for_batch(1) == "latency" and hint_for_batch(16) == "throughput"


def test_run_into_writes_the_callers_buffer_and_run_does_not_alias_it(ws) -> None:
    eng = OpenVinoEngine(ws.plain.graph_path("features"))
    x = ws.images[:4]
    out = np.zeros((4, 512), np.float32)
    eng.run_into({"images": x}, {"features": out})
    np.testing.assert_allclose(out, _ort(ws.plain.graph_path("features"), {"images": x})["features"], rtol=1e-4, atol=1e-4)
    kept = out.copy()
    other = eng.run({"images": ws.images[4:8]})["features"]
    np.testing.assert_array_equal(out, kept)  # a later plain run never writes into the earlier buffer
    assert not np.array_equal(other, kept)
    with pytest.raises(EngineError, match="buffer for output 'features'"):
        eng.run_into({"images": x}, {"features": np.zeros((4, 511), np.float32)})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_static_batch_model_runs_that_batch_only_and_equals_the_dynamic_one(ws, tmp_path, precision: str) -> None:
    """`static_batch` compiles a second, fixed-shape model: used for batches of exactly that size (run and
    run_into), never for others, and with the dynamic model's results (same kernels, same precision)."""
    if precision == "bf16" and not _bf16_here():
        return
    path = ws.plain.graph_path("features")
    n = 6
    for cache in (None, tmp_path / "ov"):  # compiled directly, and through the cache (its own entry)
        dynamic = OpenVinoEngine(path, OpenVinoOptions(precision=precision, cache_dir=cache))
        static = OpenVinoEngine(path, OpenVinoOptions(precision=precision, cache_dir=cache, static_batch=n))
        assert static.input_specs() == dynamic.input_specs()  # callers still see the dynamic batch axis
        shapes = {str(static._static.inputs[0].get_partial_shape()), str(static.compiled.inputs[0].get_partial_shape())}
        assert shapes == {"[6,3,32,32]", "[?,3,32,32]"}
        used: list[bool] = []
        real = static._requests
        static._requests = lambda key, is_static=False: (used.append(is_static), real(key, is_static))[1]  # type: ignore[method-assign]
        for x in (ws.images[:n], ws.images[: n - 1], ws.images[:n]):
            ref = dynamic.run({"images": x})["features"]
            np.testing.assert_allclose(static.run({"images": x})["features"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
            out = np.full_like(ref, np.nan)
            static.run_into({"images": x}, {"features": out})
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        assert used == [True, True, False, False, True, True]
        if cache is not None:
            assert len(list(cache.glob("features-*"))) == 2  # the fixed-shape model has an entry of its own
    with pytest.raises(InvalidInput, match="static batch must be a whole number of images >= 1, got 0"):
        OpenVinoOptions(static_batch=0)


def test_case_query_and_stage_chain_follow_ort(tmp_path) -> None:
    from tests.test_case_export import _case_checkpoint

    ckpt, _ = _case_checkpoint("resnet18", tmp_path / "case.safetensors")
    b, _ = export_bundle("resnet18", tmp_path / "case", adapter="case", checkpoint=ckpt, img_size=32, validate=False)
    root = glyph_folder(tmp_path / "glyphs", classes="ABC", per_class=4, size=40)
    x = load_checked(list_images([root]), b.manifest.preprocess)
    opened: dict[str, object] = {}

    def on(backend: str):
        def opener(name: str):
            key = (backend, name)
            if key not in opened:
                opened[key] = open_graph(b, name, backend)
            return opened[key]
        return opener

    # several batches: the chunked stage chain, each stage through run_into
    ref_feats, ref_gamma = context_pass(on("ort"), [x[:5], x[5:]], b.manifest.extra)
    feats, gamma = context_pass(on("openvino"), [x[:5], x[5:]], b.manifest.extra)
    assert any(k[0] == "openvino" and k[1].startswith("stage_") for k in opened)
    _close(feats, ref_feats, "fp32")
    _close(gamma[None], ref_gamma[None], "fp32")
    ref_q = _ort(b.graph_path("query"), {"images": x, "gamma": ref_gamma})["features"]
    _close(query_pass(on("openvino")("query"), x, gamma, b.manifest.extra), ref_q, "fp32")
    # one batch through the context graph under the THROUGHPUT hint (a tuned choice at --batch > 1): the batch
    # is never split across requests, so γ is the whole set's (split halves would give each its own γ)
    from fsdeploy.runtime.paths import CasePath

    one_feats, one_gamma = context_pass(on("ort"), [x], b.manifest.extra)
    path = CasePath(b, "openvino", EngineOptions(hint="throughput", threads=2), keep_warm=True)
    try:
        feats, st = path.support([x])
        assert "context" in path.engines.opened
    finally:
        path.close()
    _close(feats, one_feats, "fp32")
    _close(st["gamma"][None], one_gamma[None], "fp32")
    if not _bf16_here():
        return
    # the deployed path at bf16: stage state crosses the cuts as bf16 bits (uint16); images, γ, pooled means
    # and features stay f32 (`EngineOptions.public_io`), and the pass stays within bf16's tolerance
    path = CasePath(b, "openvino", EngineOptions(precision="bf16"), chunked=True)
    try:
        specs = path.engines("stage_01").output_specs()
        assert specs["pooled"].dtype == "float32" and path.engines("stage_01").input_specs()["gamma"].dtype == "float32"
        state = [n for n in specs if n != "pooled"]
        assert any(specs[n].dtype == "uint16" for n in state)  # feature maps as bf16 bits
        assert all(specs[n].dtype == "float32" for n in state if specs[n].shape[2:] == (1, 1))  # per-image means stay f32
        feats, st = path.support([x[:5], x[5:]])
    finally:
        path.close()
    _close(feats, ref_feats, "bf16")
    _close(st["gamma"][None], ref_gamma[None], "bf16")
    # bf16-mixed marks the same layers in the stage chain as in the query graph (stages past the first start
    # mid-network, so the rule is relative to the bundle's image height, not the stage's input)
    path = CasePath(b, "openvino", EngineOptions(precision="bf16-mixed"), chunked=True)
    try:
        per_stage = [path.engines(name).kernel_precisions() for name in b.manifest.case_layout().stages]
        query = path.engines("query").kernel_precisions()
        feats, st = path.support([x[:5], x[5:]])
    finally:
        path.close()
    assert 0 < query["Convolution f32"] < query["Convolution f32"] + query["Convolution bf16"]
    for kind in ("Convolution f32", "Convolution bf16"):
        assert sum(c.get(kind, 0) for c in per_stage) == query[kind], (kind, per_stage, query)
    _close(feats, ref_feats, "bf16")


def test_folded_task_graph_runs_from_bytes(ws, tmp_path) -> None:
    from fsdeploy.runtime import adapt_task, predict_images

    glyphs = glyph_folder(tmp_path / "glyphs", classes="ABC", per_class=4, size=40)
    task, _ = adapt_task(ws.plain, glyphs, None, adapter="bn-affine", steps=2)
    # the deployed path: a folded task predicts on openvino as on ORT (its graph opened from bytes)
    on_ort, on_ov = (predict_images(ws.plain, task, [glyphs], topk=3, backend=b) for b in ("ort", "openvino"))
    assert [p.labels for p in on_ov] == [p.labels for p in on_ort]
    graph = task.task_state["graph"].tobytes()
    x = load_checked(list_images([glyphs]), ws.plain.manifest.preprocess)
    ref = _ort(graph, {"images": x})["features"]
    with OpenVinoEngine(graph, OpenVinoOptions(cache_dir=tmp_path / "c")) as eng:
        _close(eng.run({"images": x})["features"], ref, "fp32")
    assert len(list((tmp_path / "c").glob("graph-*/*"))) >= 1


def test_compiled_models_are_cached_and_evicted(ws, tmp_path, monkeypatch) -> None:
    src = tmp_path / "a.onnx"
    shutil.copyfile(ws.plain.graph_path("features"), src)
    root = tmp_path / "cache"
    OpenVinoEngine(src, OpenVinoOptions(cache_dir=root))
    (entry,) = root.iterdir()
    blobs = sorted(entry.iterdir())
    assert blobs and all(p.stat().st_size > 0 for p in blobs)
    OpenVinoEngine(src, OpenVinoOptions(cache_dir=root))  # a load: no new blob
    assert sorted(entry.iterdir()) == blobs
    eng = OpenVinoEngine(src, OpenVinoOptions(cache_dir=root, hint="throughput"))  # the blob serves any hint
    assert sorted(entry.iterdir()) == blobs and str(eng.compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    src.write_bytes(src.read_bytes())  # a re-export: new modification time, new entry
    os.utime(entry, ns=(1, 1))  # the old entry is the least recently used
    size = sum(p.stat().st_size for p in entry.iterdir())
    monkeypatch.setenv("FSDEPLOY_ORT_CACHE_MAX_MB", str(size * 0.9 / 2**20))
    OpenVinoEngine(src, OpenVinoOptions(cache_dir=root))
    assert [p for p in root.iterdir()] != [entry] and not entry.exists()


def test_cache_folder_sits_beside_the_ort_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("FSDEPLOY_OPENVINO_CACHE", raising=False)
    monkeypatch.delenv("FSDEPLOY_ORT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fsdeploy" / "openvino"
    monkeypatch.setenv("FSDEPLOY_ORT_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.setenv("FSDEPLOY_ORT_CACHE", str(tmp_path / "o"))
    assert cache_dir() == tmp_path / "o" / "openvino"
    monkeypatch.setenv("FSDEPLOY_OPENVINO_CACHE", str(tmp_path / "v"))
    assert cache_dir() == tmp_path / "v"


def test_settings_and_errors() -> None:
    cfg = compile_config(OpenVinoOptions(precision="fp32", threads=3, hint="throughput"), ["FP32", "INT8"])
    assert cfg == {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 3, "INFERENCE_PRECISION_HINT": "f32"}
    assert compile_config(OpenVinoOptions(precision="bf16"), ["BF16", "FP32"])["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "INFERENCE_PRECISION_HINT" not in compile_config(OpenVinoOptions(precision="default"), ["FP32"])
    with pytest.raises(UnknownName, match="no bf16 support"):
        compile_config(OpenVinoOptions(precision="bf16"), ["FP32", "INT8"])
    with pytest.raises(UnknownName, match="fp16 runs on --backend trt"):
        OpenVinoOptions(precision="fp16")
    with pytest.raises(UnknownName, match="latency or throughput"):
        OpenVinoOptions(hint="fast")


def test_int8_needs_the_quantized_graph(tmp_path, ws) -> None:
    shutil.copytree(ws.plain.path, tmp_path / "b")
    import json

    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    man["variants"] = {rel: v for rel, v in man["variants"].items() if v["precision"] != "int8"}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="no int8 graph"):
        open_graph(load_bundle(tmp_path / "b", verify=False), "features", "openvino", EngineOptions(precision="int8"))
