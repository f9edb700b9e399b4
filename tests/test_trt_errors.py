"""Bad engines and bad requests give one clear error (no GPU needed): stale, corrupt, foreign and missing
engines, batches outside the profile, mislabelled precision, unknown refit weights, backend selection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from fsdeploy.cli import app
from fsdeploy.engines import EngineOptions
from fsdeploy.runtime import open_graph
from fsdeploy.engines.build import build_bundle, build_engine
from fsdeploy.engines.trt import TrtEngine, check_batch
from fsdeploy.pipeline.trt_compare import compare_bundle
from fsdeploy.engines.trt_backend import gpu_present, load_backend
from fsdeploy.engines.trt_records import BatchProfile, engine_records, select_engine
from fsdeploy.errors import BundleError, EngineError, InvalidInput, MissingDependency
from fsdeploy.bundle import MANIFEST, load_bundle
from fsdeploy.pipeline.export import export_bundle
from tests.trt_cases import needs_trt

pytestmark = needs_trt
BATCH = BatchProfile(1, 2, 4)
no_gpu = pytest.mark.skipif(gpu_present(), reason="checks the CPU-only error path")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 bundle with an FP32 engine, copied fresh by `bundle` for each test."""
    root = tmp_path_factory.mktemp("r18")
    bundle, _ = export_bundle("resnet18", root / "bundle", img_size=32, validate=False)
    build_bundle(bundle, precision="fp32", batch=BATCH, opt_level=0)
    return bundle.path


@pytest.fixture
def bundle(source: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, tmp_path / "bundle"))


def _only_record(path: Path):
    (rel, rec), = engine_records(load_bundle(path, verify=False).manifest).items()
    return rel, rec


def _edit_record(path: Path, **changes: object) -> None:
    data = json.loads((path / MANIFEST).read_text())
    (rel,) = [k for k, v in data["variants"].items() if v["kind"] == "trt"]
    data["variants"][rel]["info"].update(changes)  # the TensorRT record a plan variant carries
    data["variants"][rel].update({k: v for k, v in changes.items() if k in data["variants"][rel]})
    (path / MANIFEST).write_text(json.dumps(data))


def _select(path: Path, precision: str = "fp32", batch: int | None = None):
    backend = load_backend()
    return select_engine(load_bundle(path, verify=False), "features", precision, backend=backend.name, version=backend.version, batch=batch)


def test_up_to_date_engine_is_reused_untouched(bundle: Path) -> None:
    rel, rec = _only_record(bundle)
    before = (bundle / rel).stat().st_mtime_ns
    messages: list[str] = []
    (again,) = build_bundle(bundle, precision="fp32", batch=BATCH, progress=messages.append)
    assert again == rec and (bundle / rel).stat().st_mtime_ns == before
    assert any("up to date" in m for m in messages)
    assert _select(bundle)[1] == rec


def test_engine_for_another_graph_is_refused_then_rebuilt(bundle: Path) -> None:
    rel, rec = _only_record(bundle)
    _edit_record(bundle, graph_sha256="0" * 64)
    with pytest.raises(BundleError, match=r"built for another graph 'features' \(sha 00000000"):
        _select(bundle)
    messages: list[str] = []
    (new,) = build_bundle(bundle, precision="fp32", batch=BATCH, opt_level=0, progress=messages.append)
    assert any("rebuilding" in m and "another graph" in m for m in messages)
    assert new.graph_sha256 == load_bundle(bundle).manifest.files["features.onnx"]
    assert _select(bundle)[1] == new


def test_corrupt_engine_is_refused_then_rebuilt(bundle: Path) -> None:
    rel, rec = _only_record(bundle)
    data = bytearray((bundle / rel).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
    (bundle / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        _select(bundle)
    with pytest.raises(BundleError, match="does not match its sha256"):
        TrtEngine(bundle / rel, record=rec)  # the hash is checked before TensorRT (or a GPU) is needed
    (new,) = build_bundle(bundle, precision="fp32", batch=BATCH, opt_level=0)
    assert new.sha256 == _select(bundle)[1].sha256
    load_bundle(bundle)  # every listed file matches again


def test_engine_from_another_tensorrt_is_refused(bundle: Path) -> None:
    _edit_record(bundle, backend_version="0.0.1")
    with pytest.raises(EngineError, match=r"built with tensorrt\S* 0\.0\.1; this machine has"):
        _select(bundle)


def test_missing_precision_and_batch_outside_profile(bundle: Path) -> None:
    with pytest.raises(EngineError, match="no fp16 TensorRT engine for graph 'features'.*--precision fp16"):
        _select(bundle, "fp16")
    with pytest.raises(EngineError, match=r"accepts batch 9 \(profiles: 1\.\.4\)"):
        _select(bundle, batch=9)
    profile = {"images": (0, 1, 2, 4)}
    check_batch("eng", profile, {"images": np.zeros((4, 3, 32, 32), np.float32)})
    with pytest.raises(EngineError, match=r"input 'images' has batch 5, outside this engine's profile \(min 1, max 4, opt 2\)"):
        check_batch("eng", profile, {"images": np.zeros((5, 3, 32, 32), np.float32)})


def test_graph_changed_since_export_is_refused(bundle: Path) -> None:
    with open(bundle / "features.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="changed since export"):
        build_bundle(bundle, precision="fp32", batch=BATCH)
    with pytest.raises(BundleError, match="has no graph 'nope'"):
        build_bundle(bundle, precision="fp32", graphs=["nope"])


def test_fp32_graph_is_never_labelled_fp16(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="asked for fp16 but the network has no FP16 layers"):
        build_engine(bundle / "features.onnx", tmp_path / "x.engine", profile=BATCH, precision="fp16", opt_level=0)
    assert not (tmp_path / "x.engine").exists()


def test_unknown_refit_weight_names_the_real_ones(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no weights named 'conv1.weight'; refittable weights are ONNX initializer names, e.g. "):
        build_engine(bundle / "features.onnx", tmp_path / "x.engine", profile=BATCH, precision="fp32", refittable=["conv1.weight"])


@no_gpu
def test_cpu_only_paths_say_a_gpu_is_needed(bundle: Path, tmp_path: Path) -> None:
    rel, rec = _only_record(bundle)
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        TrtEngine(bundle / rel, record=rec)
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        open_graph(load_bundle(bundle), "features", "trt", EngineOptions(precision="fp32"))
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        compare_bundle(load_bundle(bundle))
    weight = onnx.load(str(bundle / "features.onnx"), load_external_data=False).graph.initializer[0].name
    if load_backend().builds_on_cpu:
        with pytest.raises(EngineError, match="cannot compile refittable weights without a GPU"):
            build_engine(bundle / "features.onnx", tmp_path / "r.engine", profile=BATCH, precision="fp32", refittable=[weight])


def test_only_the_batch_axis_may_be_dynamic(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, str(tmp_path / "g.onnx"))
    with pytest.raises(EngineError, match=r"input 'x' axis 1 is dynamic \(width\); engines accept only a dynamic 'batch' axis"):
        build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", profile=BATCH, precision="fp32")


def test_batch_profile_parsing() -> None:
    assert BatchProfile.parse("1:8:32") == BatchProfile(1, 8, 32)
    assert BatchProfile.parse((2, 2, 2)).tag == "b2_2_2"
    for bad in ("8:1:32", "0:1:2", "1:8", "a:b:c"):
        with pytest.raises(InvalidInput, match="MIN"):
            BatchProfile.parse(bad)


def test_backend_choice_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsdeploy.engines.trt_backend as tb

    monkeypatch.setenv(tb.ENV_CHOICE, "tensorrt_llm")
    with pytest.raises(EngineError, match="is not a TensorRT backend; use one of tensorrt, tensorrt_rtx"):
        load_backend()
    monkeypatch.delenv(tb.ENV_CHOICE)
    load_backend()  # binds Polygraphy to the installed flavour
    other = "tensorrt" if load_backend().is_rtx else "tensorrt_rtx"
    monkeypatch.setenv(tb.ENV_CHOICE, other)
    with pytest.raises(EngineError, match="polygraphy was imported for .* before fsdeploy chose"):
        load_backend()
    monkeypatch.delenv(tb.ENV_CHOICE)
    monkeypatch.setattr(tb, "available", lambda module: False)
    with pytest.raises(MissingDependency, match="neither tensorrt nor tensorrt_rtx is installed; run: pip install"):
        load_backend()


def test_backend_is_recorded(bundle: Path) -> None:
    backend = load_backend()
    _, rec = _only_record(bundle)
    assert (rec.backend, rec.backend_version) == (backend.name, backend.version)
    assert rec.file.split("-")[2] == backend.tag
    assert rec.build_s > 0


def test_cli_build_and_errors(bundle: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["build", str(bundle), "--precision", "fp16", "--profile", "1:2:4", "--opt-level", "0", "--graphs", "features"])
    assert result.exit_code == 0, result.output
    assert "fp16" in result.output and "features" in result.output
    assert any(r.precision == "fp16" for r in engine_records(load_bundle(bundle).manifest).values())
    result = runner.invoke(app, ["build", str(bundle), "--profile", "8:1:2"])
    assert isinstance(result.exception, InvalidInput)
    result = runner.invoke(app, ["build", str(bundle), "--precision", "int4"])
    assert isinstance(result.exception, InvalidInput)
