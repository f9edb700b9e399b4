"""INT8 static quantization: QDQ graph, agreement with FP32 measured independently, bundle id kept, atomic writes."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fsdeploy.bench.measure import write_photo_folder
from fsdeploy.data.folders import list_images
from fsdeploy.data.images import load_checked
from fsdeploy.engines import EngineOptions
from fsdeploy.runtime import open_graph
from fsdeploy.errors import BundleError, InvalidInput, UnknownName
from fsdeploy.bundle import Bundle, load_bundle
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.pipeline.quantize import quantize_bundle, split_images
from fsdeploy.runtime import TaskArtefact
from tests.helpers import glyph_folder, make_checkpoint

# Tiny resnet18 at 32 px reaches per-image cosine ~0.997 (min over held-out crops); the bench's resnet18
# at 224 px reaches ~0.999. 0.98 leaves room for ORT kernel changes while still catching a broken
# calibration (wrong preprocessing or no data gives cosine well below 0.9).
MIN_COSINE = 0.98


def invoke(*args: str) -> tuple[int, str]:
    """Run the CLI as the console script does: a library error becomes one line and exit code 1."""
    from typer.testing import CliRunner

    from fsdeploy.cli import app
    from fsdeploy.errors import FsdeployError

    result = CliRunner().invoke(app, list(args), standalone_mode=False, catch_exceptions=True)
    if isinstance(result.exception, FsdeployError):
        return 1, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a bundle folder with its bytes (hidden temp files included)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _ort_features(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Plain onnxruntime session, independent of fsdeploy's engines."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(["features"], {"images": images})[0]


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    ckpt = make_checkpoint("resnet18", tmp / "w.safetensors", img_size=32)
    fresh, _ = export_bundle("resnet18", tmp / "fresh", checkpoint=ckpt)
    photos = write_photo_folder(tmp / "photos", classes=3, per_class=8, side=64, seed=0)
    shutil.copytree(fresh.path, tmp / "quantized")
    before = load_bundle(tmp / "quantized")
    report = quantize_bundle(before, [photos])
    return SimpleNamespace(tmp=tmp, fresh=fresh, photos=photos, before=before, report=report, bundle=load_bundle(tmp / "quantized"))


def _int8(manifest) -> dict:
    """The int8 variant's record (the quantization report) of the features graph."""
    (variant,) = manifest.find_variants("features", kind="onnx", precision="int8")
    return variant.info


def _copy(bundle: Bundle, dst: Path) -> Path:
    shutil.copytree(bundle.path, dst)
    return dst


def test_int8_graph_is_qdq_with_int8_weights(ws) -> None:
    import onnx

    info = _int8(ws.bundle.manifest)
    model = onnx.load(str(ws.bundle.file(info["file"])))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(ws.fresh.graph_path("features"))).graph.node)
    assert len(int8_weights) == n_conv, "every conv weight is stored as int8"
    fp32_ops = {n.op_type for n in onnx.load(str(ws.fresh.graph_path("features"))).graph.node}
    assert "QuantizeLinear" not in fp32_ops


def test_int8_features_follow_fp32(ws) -> None:
    """Measured here with plain ORT sessions on every photo, and the report's numbers recomputed."""
    images = load_checked(list_images([ws.photos]), ws.bundle.manifest.preprocess)
    ref = _ort_features(ws.bundle.graph_path("features"), images)
    int8_file = ws.bundle.file(ws.report.file)
    got = _ort_features(int8_file, images)
    with open_graph(ws.bundle, "features", "ort", EngineOptions(precision="int8")) as eng:
        np.testing.assert_allclose(eng.run({"images": images})["features"], got, rtol=1e-5, atol=1e-5)
    assert np.abs(got - ref).max() > 0, "the int8 engine must not be the fp32 graph"
    assert _row_cosine(got, ref).min() >= MIN_COSINE

    _, held = split_images(list_images([ws.photos]), 64)
    assert ws.report.validated_on == "held-out" and ws.report.validation_images == len(held) == 6
    assert ws.report.calibration_images == 18
    held_images = load_checked(held, ws.bundle.manifest.preprocess)
    a, b = _ort_features(int8_file, held_images), _ort_features(ws.bundle.graph_path("features"), held_images)
    cos = _row_cosine(a.astype(np.float64), b.astype(np.float64))
    assert ws.report.cosine_min == pytest.approx(cos.min(), abs=1e-6)
    assert ws.report.cosine_mean == pytest.approx(cos.mean(), abs=1e-6)
    assert ws.report.max_abs == pytest.approx(np.abs(a - b).max(), rel=1e-6)


def test_bundle_id_kept_and_int8_file_hash_checked(ws) -> None:
    m, old = ws.bundle.manifest, ws.before.manifest
    assert m.bundle_id == old.bundle_id and m.graphs == old.graphs
    info = _int8(m)
    assert info == ws.report.to_dict()
    from fsdeploy.pipeline.int8_range import int8_kernels

    assert info["source_file"] == "features.onnx" and info["onnxruntime"]
    assert info["reduce_range"] is (not int8_kernels().full_range) and info["range_chosen_by"] == "cpu"
    assert m.files[info["file"]] and set(m.files) == set(old.files) | {info["file"]}
    load_bundle(ws.bundle.path, verify=True)


def test_tampered_int8_file_is_refused(ws, tmp_path) -> None:
    folder = _copy(ws.bundle, tmp_path / "b")
    f = folder / ws.report.file
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(folder)
    f.unlink()
    with pytest.raises(BundleError, match="is missing"):
        load_bundle(folder)


def test_requantizing_replaces_the_int8_graph(ws, tmp_path) -> None:
    folder = _copy(ws.bundle, tmp_path / "b")
    report = quantize_bundle(load_bundle(folder), [ws.photos], max_images=8, reduce_range=False)
    b = load_bundle(folder)
    assert _int8(b.manifest)["reduce_range"] is False and report.calibration_images == 8
    assert sorted(p.name for p in folder.glob("*.int8.*")) == [report.file] != [ws.report.file]
    assert b.manifest.bundle_id == ws.before.manifest.bundle_id


def test_precision_errors_are_one_line(ws) -> None:
    with pytest.raises(BundleError, match=r"no int8 graph; make one with `fsdeploy quantize .* --calib DIR`") as exc:
        open_graph(ws.fresh, "features", "ort", EngineOptions(precision="int8"))
    assert "\n" not in str(exc.value)
    with pytest.raises(UnknownName, match="fp16 engines run on --backend trt"):
        open_graph(ws.bundle, "features", "ort", EngineOptions(precision="fp16"))
    from fsdeploy.runtime import feature_path

    with pytest.raises(UnknownName, match="own fp32 graph; drop --precision int8"):  # folded TSA / BN-affine tasks
        feature_path(ws.bundle, "ort", EngineOptions(precision="int8"), task_state={"graph": np.zeros(4, np.uint8)})


@pytest.mark.parametrize("adapter", ["case", "toast"])
def test_other_adapters_are_refused(ws, adapter) -> None:
    faked = Bundle(ws.fresh.path, replace(ws.fresh.manifest, adapter=adapter))
    with pytest.raises(InvalidInput, match=f"int8 is offered for adapter none bundles; this bundle uses {adapter}"):
        quantize_bundle(faked, [ws.photos])


def test_image_split() -> None:
    paths = [Path(f"{i}.jpg") for i in range(100)]
    cal, held = split_images(paths, 64)
    assert len(cal) == 64 and len(held) == 25 and not set(cal) & set(held)
    cal, held = split_images(paths[:10], 64)  # 10 // 4 < MIN_HELD_OUT: validate on the calibration images
    assert len(cal) == 10 and held == []
    with pytest.raises(InvalidInput, match="--images must be >= 1"):
        split_images(paths, 0)


def _fail(*_a, **_k):
    raise RuntimeError("calibration blew up")


@pytest.mark.parametrize("start", ["fresh", "quantized"])
def test_failure_leaves_bundle_untouched(ws, tmp_path, monkeypatch, start) -> None:
    folder = _copy(ws.fresh if start == "fresh" else ws.bundle, tmp_path / "b")
    before = _snapshot(folder)
    monkeypatch.setattr("onnxruntime.quantization.quantize_static", _fail)
    with pytest.raises(RuntimeError, match="blew up"):
        quantize_bundle(load_bundle(folder), [ws.photos])
    assert _snapshot(folder) == before


def test_failed_manifest_write_removes_the_new_file(ws, tmp_path, monkeypatch) -> None:
    folder = _copy(ws.bundle, tmp_path / "b")
    before = _snapshot(folder)
    monkeypatch.setattr("fsdeploy.bundle.folder.write_manifest", _fail)
    with pytest.raises(RuntimeError):
        quantize_bundle(load_bundle(folder), [ws.photos], reduce_range=False)  # other bytes, so another file name
    assert _snapshot(folder) == before


def test_cli_quantize_then_serve_int8(ws, tmp_path) -> None:
    folder = _copy(ws.fresh, tmp_path / "b")
    code, out = invoke("quantize", str(folder), "--calib", str(ws.photos), "--iters", "3")
    assert code == 0, out
    for word in ("cosine", "held-out", "FP32", "INT8", "speed-up", "wrote"):
        assert word in out, out
    support, query = glyph_folder(tmp_path / "s", classes="AB", per_class=3), glyph_folder(tmp_path / "q", classes="AB", per_class=2, seed=1)
    task = tmp_path / "t.npz"
    code, out = invoke("adapt", str(folder), str(support), "--head", "ncc", "--precision", "int8", "--out", str(task))
    assert code == 0, out
    assert TaskArtefact.load(task).info["precision"] == "int8"
    code, out = invoke("predict", str(folder), str(task), str(query), "--precision", "int8", "--json")
    assert code == 0, out
    probs = [json.loads(line)["probs"][0] for line in out.strip().splitlines()]
    from fsdeploy.heads.pipeline import TaskModel

    b = load_bundle(folder)
    images = load_checked(list_images([query]), b.manifest.preprocess)
    want = TaskModel.from_state(TaskArtefact.load(task).model_state).predict_proba(_ort_features(b.file(_int8(b.manifest)["file"]), images))
    np.testing.assert_allclose(probs, want.max(axis=1), rtol=1e-5)


def test_cli_empty_calibration_folder(ws, tmp_path) -> None:
    folder = _copy(ws.fresh, tmp_path / "b")
    (tmp_path / "empty").mkdir()
    manifest = (folder / "manifest.json").read_bytes()
    code, out = invoke("quantize", str(folder), "--calib", str(tmp_path / "empty"))
    assert code != 0 and "no images found" in out and "\n" not in out.strip(), out
    assert (folder / "manifest.json").read_bytes() == manifest


# /proc/cpuinfo excerpts of the two CPU kinds (flags trimmed to the relevant ones)
AVX2_ONLY = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU E5-2690 v4\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
VNNI = "processor\t: 0\nflags\t\t: fpu avx avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"


def test_int8_range_follows_the_cpu_flags() -> None:
    from fsdeploy.pipeline.int8_range import cpu_flags, int8_kernels

    assert int8_kernels(cpu_flags(AVX2_ONLY)).full_range is False
    assert int8_kernels(cpu_flags(AVX2_ONLY)).isa == "AVX2 without VNNI"
    assert int8_kernels(cpu_flags(VNNI)) == int8_kernels({"avx512_vnni"}) and int8_kernels(cpu_flags(VNNI)).full_range
    assert int8_kernels({"avx2", "avx_vnni"}).isa == "AVX-VNNI" and int8_kernels({"amx_int8", "avx512_vnni"}).isa == "AMX-INT8"
    assert int8_kernels({"fp", "asimd", "asimddp"}).full_range and int8_kernels(set()).full_range is False
    assert cpu_flags("Features\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}


@pytest.mark.parametrize(("cpuinfo", "reduce_range"), [(AVX2_ONLY, True), (VNNI, False)], ids=["avx2-only", "vnni"])
def test_quantize_picks_the_range_and_warns_only_where_true(ws, tmp_path, monkeypatch, cpuinfo, reduce_range) -> None:
    from fsdeploy.pipeline import int8_range

    parse = int8_range.cpu_flags
    monkeypatch.setattr(int8_range, "cpu_flags", lambda text=None: parse(cpuinfo))  # this machine read as that CPU
    folder = _copy(ws.fresh, tmp_path / "b")
    code, out = invoke("quantize", str(folder), "--calib", str(ws.photos), "--iters", "1", "--images", "8")
    assert code == 0, out
    info = _int8(load_bundle(folder).manifest)
    assert info["reduce_range"] is reduce_range and info["range_chosen_by"] == "cpu"
    assert ("7-bit (chosen for this CPU" if reduce_range else "full-range 8-bit (chosen for this CPU") in out
    assert "saturate" not in out and "costs accuracy" not in out
    for word in ("centred cosine", "few-shot decisions as FP32", "raw cosine"):
        assert word in out, out
    code, out = invoke("quantize", str(folder), "--calib", str(ws.photos), "--iters", "1", "--images", "8", "--full-range" if reduce_range else "--reduce-range")
    assert code == 0, out
    assert ("saturate" in out) is reduce_range and ("costs accuracy" in out) is (not reduce_range)


def test_report_agreement_recomputed(ws) -> None:
    """Centred cosine and decision agreement of the report, recomputed from plain ORT sessions."""
    from fsdeploy.agreement import agreement_of_features

    paths = list_images([ws.photos])
    cal, held = split_images(paths, 64)
    pre = ws.bundle.manifest.preprocess
    ref_cal = _ort_features(ws.bundle.graph_path("features"), load_checked(cal, pre))
    q = ws.bundle.file(ws.report.file)
    ref_h, got_h = (_ort_features(f, load_checked(held, pre)) for f in (ws.bundle.graph_path("features"), q))
    mu = ref_cal.astype(np.float64).mean(0)
    cc = _row_cosine(got_h - mu, ref_h - mu)
    assert ws.report.centred_cosine_min == pytest.approx(cc.min(), abs=1e-5) and ws.report.centred_cosine_mean == pytest.approx(cc.mean(), abs=1e-5)
    allp = cal + held
    ref, got = (_ort_features(f, load_checked(allp, pre)) for f in (ws.bundle.graph_path("features"), q))
    labels = np.unique([p.parent.name for p in allp], return_inverse=True)[1]
    a = agreement_of_features(got, ref, labels, shots=5, episodes=100)
    assert ws.report.decision_agreement == pytest.approx(a.decision_agreement) and ws.report.agreement_decisions == a.decisions > 0
