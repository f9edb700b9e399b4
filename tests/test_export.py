"""Export: ONNX Runtime equals PyTorch for each family; bundles are hash-checked and written atomically."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fsdeploy.backbones import create_backbone
from fsdeploy.data.samples import real_batch
from fsdeploy.engines import EngineOptions
from fsdeploy.runtime import open_graph
from fsdeploy.errors import BundleError, EngineError, InvalidInput, UnknownName, ValidationFailed
from fsdeploy.adapters import ADAPTERS
from fsdeploy.exporters import graphs
from fsdeploy.bundle import load_bundle
from fsdeploy.pipeline.export import export_bundle
from tests.helpers import make_checkpoint

MODELS = ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"]


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    ckpt = make_checkpoint(name, tmp / "w.safetensors", img_size=32)
    bundle, report = export_bundle(name, tmp / "bundle", checkpoint=ckpt)
    return name, ckpt, bundle, report


def test_ort_matches_pytorch_fp32(exported) -> None:
    name, ckpt, bundle, report = exported
    model, pre = create_backbone(name, checkpoint=ckpt)
    images = np.concatenate(
        [real_batch(pre, 3, np.random.default_rng(0)), np.random.default_rng(1).standard_normal((2, *pre.input_size))]
    ).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    assert np.abs(ref).mean() > 1e-2, "features too small for a max-abs check to mean anything"
    with open_graph(bundle, "features", "ort") as eng:
        got = eng.run({"images": images})["features"]
    assert got.shape == ref.shape == (5, bundle.manifest.feature_dim)
    assert np.abs(got - ref).max() <= 1e-4
    assert report is not None and report.passed
    assert {c.inputs for c in report.checks} == {"random", "real"}


def test_torch_engine_rebuilds_exported_weights(exported) -> None:
    _, _, bundle, _ = exported
    x = np.random.default_rng(2).standard_normal((3, *bundle.manifest.preprocess.input_size)).astype(np.float32)
    with open_graph(bundle, "features", "ort") as a, open_graph(bundle, "features", "torch", EngineOptions(device="cpu")) as b:
        np.testing.assert_allclose(a.run({"images": x})["features"], b.run({"images": x})["features"], atol=1e-4)


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_run_into_writes_the_callers_buffer(exported, backend: str) -> None:
    """ONNX Runtime binds the buffer (IOBinding); other engines fall back to run + copy. Both equal `run`."""
    _, _, bundle, _ = exported
    x = np.random.default_rng(3).standard_normal((2, *bundle.manifest.preprocess.input_size)).astype(np.float32)
    with open_graph(bundle, "features", backend, EngineOptions(device="cpu")) as eng:
        want = eng.run({"images": x})["features"]
        buf = np.full((2, bundle.manifest.feature_dim), np.nan, dtype=np.float32)
        eng.run_into({"images": x}, {"features": buf})
        np.testing.assert_array_equal(buf, want)
        with pytest.raises(EngineError, match="buffer for output 'features'"):
            eng.run_into({"images": x}, {"features": np.empty((2, bundle.manifest.feature_dim + 1), np.float32)})
        with pytest.raises(EngineError, match="no output 'logits'"):
            eng.run_into({"images": x}, {"logits": buf})


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_torch_backend_refuses_other_precisions(exported, precision: str) -> None:
    _, _, bundle, _ = exported
    with pytest.raises(UnknownName, match=f"torch backend runs .* fp32; got --precision {precision}"):
        open_graph(bundle, "features", "torch", EngineOptions(device="cpu", precision=precision))


def test_manifest_records_what_devices_need(exported) -> None:
    name, ckpt, bundle, _ = exported
    m = json.loads((bundle.path / "manifest.json").read_text())
    assert m["model"] == name and m["adapter"] == "none" and m["opset"] >= 17
    assert m["graphs"]["features"]["inputs"]["images"]["shape"][0] == "batch"
    assert set(m["files"]) == {"features.onnx", "torch.safetensors"}
    assert m["validation"]["passed"] is True
    assert m["source"]["checkpoint_sha256"] and m["versions"]["onnxruntime"]


def test_tampered_bundle_is_refused(tmp_path) -> None:
    ckpt = make_checkpoint("resnet18", tmp_path / "w.safetensors")
    bundle, _ = export_bundle("resnet18", tmp_path / "b", checkpoint=ckpt)
    with open(bundle.path / "features.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path)


def test_failed_validation_writes_nothing(tmp_path, monkeypatch) -> None:
    strict = graphs.ExportSpec(atol=-1.0)  # every output fails
    plain = ADAPTERS.get("none")
    monkeypatch.setitem(ADAPTERS._entries, "none", replace(plain, build=lambda req: replace(plain.build(req), graphs=tuple(
        replace(g, spec=strict) for g in plain.build(req).graphs))))
    with pytest.raises(ValidationFailed, match="nothing was written"):
        export_bundle("resnet18", tmp_path / "b", img_size=32)
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    bundle, report = export_bundle("resnet18", tmp_path / "b", img_size=32, validate=False)
    assert report is None and bundle.manifest.validation == {"skipped": True}


def test_bad_model_and_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(UnknownName, match="unknown timm model 'resnet_nope'"):
        export_bundle("resnet_nope", tmp_path / "b")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(InvalidInput, match="cannot read checkpoint .*bad.pth"):
        export_bundle("resnet18", tmp_path / "b", checkpoint=bad)
    other = make_checkpoint("efficientnet_b0", tmp_path / "eff.safetensors")
    with pytest.raises(InvalidInput, match="trained for efficientnet_b0, not resnet18"):
        export_bundle("resnet18", tmp_path / "b", checkpoint=other)
    assert not (tmp_path / "b").exists()


def test_validation_tolerance_scales_with_the_output() -> None:
    from fsdeploy.compare import CompareReport, OutputCheck, Tolerance, compare

    ref = np.array([[3.0e6, -1.0], [2.0, 0.5]])
    got = ref + np.array([[25.0, 0.0], [0.0, 2e-5]])
    (check,) = compare("stage_15", "real", {"state": got}, {"state": ref})
    assert check.max_abs == pytest.approx(25.0) and check.ref_max_abs == pytest.approx(3.0e6)
    assert CompareReport((check,), Tolerance(atol=1e-4, rtol=1e-5)).passed  # 25 <= 1e-4 + 30
    assert not CompareReport((check,), Tolerance(atol=1e-4, rtol=1e-6)).passed  # 25 > 3
    small = OutputCheck("features", "real", "features", True, 2e-3, 1.0, 1.0)
    assert not CompareReport((small,), Tolerance(atol=1e-4, rtol=1e-5)).passed  # relative part is only 1e-5 here
    old = {"atol": 1e-4, "checks": [{"graph": "g", "inputs": "random", "name": "f", "shape_ok": True, "max_abs": 5e-5, "cosine": 1.0}]}
    restored = CompareReport.from_dict(old)  # reports written before rtol existed
    assert restored.default.rtol == 0.0 and restored.passed
