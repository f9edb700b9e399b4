"""The bundle layer: typed records, legacy manifests, resolve, record_variant under concurrent writers."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from fsdeploy.atomic import sha256_file
from fsdeploy.bundle import CaseLayout, Variant, load_bundle, record_variant, resolve
from fsdeploy.compare import CompareReport, OutputCheck, Tolerance
from fsdeploy.errors import BundleError
from fsdeploy.pipeline.export import export_bundle
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    ckpt = make_checkpoint("resnet18", root / "w.safetensors", img_size=32)
    bundle, _ = export_bundle("resnet18", root / "b", checkpoint=ckpt, img_size=32)
    return bundle.path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_legacy_manifest_records_become_variants(bundle_dir: Path, tmp_path: Path) -> None:
    """Manifests written before `variants` (TensorRT `engines`, extra["int8"]) load unchanged, as variants."""
    b = _copy(bundle_dir, tmp_path / "old")
    d = json.loads((b / "manifest.json").read_text())
    graph_sha = d["files"]["features.onnx"]
    (b / "features.int8.abc.onnx").write_bytes((b / "features.onnx").read_bytes())
    d["files"]["features.int8.abc.onnx"] = sha256_file(b / "features.int8.abc.onnx")
    d["extra"]["int8"] = {"graph": "features", "file": "features.int8.abc.onnx", "source_file": "features.onnx",
                          "source_sha256": graph_sha, "cosine_min": 0.99}
    d.pop("variants", None)
    d["engines"] = {"engines/features-x.engine": {"graph": "features", "precision": "fp16", "graph_sha256": graph_sha,
                                                  "sha256": "00", "file": "engines/features-x.engine"}}
    (b / "manifest.json").write_text(json.dumps(d))
    loaded = load_bundle(b, verify=False)
    kinds = {(v.kind, v.precision) for v in loaded.manifest.variants.values()}
    assert kinds == {("onnx", "int8"), ("trt", "fp16")}
    assert "int8" not in loaded.manifest.extra
    assert loaded.manifest.bundle_id == load_bundle(bundle_dir).manifest.bundle_id  # variants never change the id
    assert resolve(loaded, "features", "int8").path == b / "features.int8.abc.onnx"
    assert [v.file for v in resolve(loaded, "features", "fp16", "trt").candidates] == ["engines/features-x.engine"]


def test_resolve_refuses_missing_and_stale_variants(bundle_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(_copy(bundle_dir, tmp_path / "b"))
    with pytest.raises(BundleError, match="has no int8 graph; make one with `fsdeploy quantize"):
        resolve(b, "features", "int8")
    (b.path / "x.onnx").write_bytes(b"x")
    b, _ = record_variant(b, Variant("x.onnx", "features", "onnx", "int8", "0" * 64, sha256_file(b.path / "x.onnx")))
    with pytest.raises(BundleError, match="made from an older features.onnx; re-run `fsdeploy quantize"):
        resolve(b, "features", "int8")
    with pytest.raises(BundleError, match="has no graph 'nope'"):
        resolve(b, "nope")


def _writer(path: str, rel: str, rounds: int) -> None:
    b = load_bundle(path, verify=False)
    for i in range(rounds):
        f = Path(path) / f"{rel}.{i}"
        f.write_bytes(rel.encode() + bytes([i]))
        record_variant(b, Variant(f.name, "features", rel, "fp32", "g", sha256_file(f)))


def test_concurrent_writers_keep_every_record(bundle_dir: Path, tmp_path: Path) -> None:
    """Two processes recording variants at once (as `build` and `quantize` do) lose nothing: 20 records each."""
    b = _copy(bundle_dir, tmp_path / "race")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(b), kind, 20)) for kind in ("trt", "onnx")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = load_bundle(b).manifest  # every listed file is there with its hash
    assert sorted(m.variants) == sorted([f"trt.{i}" for i in range(20)] + [f"onnx.{i}" for i in range(20)])


def test_case_layout_reads_the_manifest_keys() -> None:
    extra = {"gamma_layout": [{"name": "a", "offset": 0, "length": 3}, {"name": "b", "offset": 3, "length": 2}],
             "gamma_size": 5, "chunked": {"stages": ["stage_00", "stage_01"], "state_floats_per_image": [7, 9]}}
    layout = CaseLayout.from_extra(extra)
    assert [(s.site, s.offset, s.stop) for s in layout.slices] == [("a", 0, 3), ("b", 3, 5)]
    assert layout.gamma_size == 5 and layout.stages == ("stage_00", "stage_01") and layout.state_floats_per_image == (7, 9)
    with pytest.raises(BundleError, match="no CaSE gamma layout"):
        CaseLayout.from_extra({})


def test_each_graph_is_judged_by_its_own_tolerance() -> None:
    """Export no longer collapses tolerances to the maximum over graphs."""
    loose = OutputCheck("stage_00", "real", "state", True, 5e-3, 1.0, 1.0)
    tight = OutputCheck("features", "real", "features", True, 5e-3, 1.0, 1.0)
    per = {"stage_00": Tolerance(1e-2), "features": Tolerance(1e-4)}
    report = CompareReport((loose, tight), Tolerance(1e-2), per)
    assert report.ok(loose) and not report.ok(tight) and not report.passed
    assert report.failures() == [tight] and report.worst() is tight
    back = CompareReport.from_dict(report.to_dict())
    assert back.per_graph == per and not back.passed
