"""TensorRT engines on a GPU: run, compare with ONNX Runtime, refit. Skipped cleanly without a CUDA GPU.

References: ONNX Runtime on the same FP32 graph (and, for refit, on the graph with the new weights written
into its initializer), never the TensorRT code under test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from fsdeploy.cli import app
from fsdeploy.data.samples import real_batch
from fsdeploy.engines import EngineOptions
from fsdeploy.runtime import open_graph
from fsdeploy.engines.base import TensorSpec
from fsdeploy.engines.build import build_bundle, build_engine
from fsdeploy.engines.ort import OrtEngine, OrtOptions
from fsdeploy.engines.trt import TrtEngine
from fsdeploy.pipeline.trt_compare import compare_bundle
from fsdeploy.engines.trt_backend import deserialize, load_backend
from fsdeploy.engines.trt_precision import inspect_precisions
from fsdeploy.engines.trt_records import PRECISIONS, BatchProfile, engine_records
from fsdeploy.errors import EngineError
from fsdeploy.bundle import Bundle, load_bundle
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.compare import cosine
from tests.helpers import make_checkpoint
from tests.trt_cases import needs_trt

pytestmark = [pytest.mark.gpu, needs_trt]
BATCH = BatchProfile(1, 2, 4)
CPU = OrtOptions(providers=("CPUExecutionProvider",))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    root = tmp_path_factory.mktemp("gpu")
    ckpt = make_checkpoint("resnet18", root / "weights.safetensors", img_size=32)
    b, _ = export_bundle("resnet18", root / "bundle", checkpoint=ckpt, img_size=32, validate=False)
    for precision in PRECISIONS:  # TensorRT-RTX: target this GPU, which may not be in its portable set
        build_bundle(b, precision=precision, batch=BATCH, current_gpu=True)
    return load_bundle(b.path)


@pytest.fixture(scope="module")
def images(bundle: Bundle) -> np.ndarray:
    return real_batch(bundle.manifest.preprocess, 4, np.random.default_rng(0))


def _ort(path: Path, images: np.ndarray) -> np.ndarray:
    with OrtEngine(path, CPU) as eng:
        return eng.run({"images": images})["features"]


def test_fp32_engine_matches_onnx_runtime(bundle: Bundle, images: np.ndarray) -> None:
    want = _ort(bundle.graph_path("features"), images)
    with open_graph(bundle, "features", "trt", EngineOptions(precision="fp32")) as eng:
        assert eng.input_specs() == {"images": TensorSpec(("batch", 3, 32, 32), "float32")}
        assert eng.batch_profile == {"images": (1, 2, 4)}
        got = eng.run({"images": images})["features"]
        got1 = eng.run({"images": images[:1]})["features"]
    assert float(np.abs(want).max()) > 1e-2
    assert float(np.abs(got - want).max()) <= 1e-3
    assert cosine(got, want) >= 0.9999
    np.testing.assert_allclose(got1, want[:1], atol=1e-3)


def test_fp16_engine_is_close_to_onnx_runtime(bundle: Bundle, images: np.ndarray) -> None:
    want = _ort(bundle.graph_path("features"), images)
    with open_graph(bundle, "features", "trt", EngineOptions(precision="fp16")) as eng:
        got = eng.run({"images": images})["features"]
    assert cosine(got, want) >= 0.999
    assert float(np.abs(got - want).max()) <= 1e-2 + 1e-2 * float(np.abs(want).max())


def test_batch_outside_profile_is_refused(bundle: Bundle) -> None:
    with open_graph(bundle, "features", "trt", EngineOptions(precision="fp32")) as eng:
        with pytest.raises(EngineError, match=r"has batch 5, outside this engine's profile \(min 1, max 4, opt 2\)"):
            eng.run({"images": np.zeros((5, 3, 32, 32), np.float32)})


def test_compare_passes_for_both_precisions(bundle: Bundle) -> None:
    for precision in PRECISIONS:
        report = compare_bundle(bundle, precision=precision, n=4)
        assert report.passed, report.to_dict()
        assert {c.name for c in report.checks} == {"features"}
    result = CliRunner().invoke(app, ["compare", str(bundle.path), "--precision", "fp16", "--batch", "4"])
    assert result.exit_code == 0, result.output


def test_engine_layers_and_corrupt_bytes(bundle: Bundle) -> None:
    for rec in engine_records(bundle.manifest).values():
        assert rec.engine_layer_precisions, "built on a GPU: the inspector's view is recorded"
        assert inspect_precisions(bundle.file(rec.file).read_bytes()) == rec.engine_layer_precisions
    with pytest.raises(EngineError, match="is not a valid"):
        deserialize(b"not an engine" * 100)


def test_refit_changes_exactly_the_chosen_weights(bundle: Bundle, images: np.ndarray, tmp_path: Path) -> None:
    model = onnx.load(str(bundle.graph_path("features")))
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    name = conv_weights[-1]
    engine_path = tmp_path / "refit.engine"
    rec = build_engine(bundle.graph_path("features"), engine_path, profile=BATCH, precision="fp32",
                       refittable=[name], current_gpu=True)
    assert rec.refittable == (name,)
    init = next(i for i in model.graph.initializer if i.name == name)
    new = (numpy_helper.to_array(init) * -0.5).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(new, name))
    onnx.save(model, str(tmp_path / "changed.onnx"))
    with TrtEngine(engine_path) as eng:
        before = eng.run({"images": images})["features"]
        np.testing.assert_allclose(before, _ort(bundle.graph_path("features"), images), atol=1e-3)
        eng.refit({name: new})
        after = eng.run({"images": images})["features"]
        with pytest.raises(EngineError, match="no refittable weights \\['nope'\\]"):
            eng.refit({"nope": new})
        with pytest.raises(EngineError, match="values; the engine's has"):
            eng.refit({name: new[:1]})
    want = _ort(tmp_path / "changed.onnx", images)
    assert float(np.abs(after - want).max()) <= 1e-3
    assert float(np.abs(after - before).max()) > 1e-2  # the refit really changed the output
    with TrtEngine(bundle.file(engine_records(bundle.manifest).popitem()[0])) as plain:
        with pytest.raises(EngineError, match="no refittable weights"):
            plain.refit({name: new})
    assert load_backend().name in rec.backend
