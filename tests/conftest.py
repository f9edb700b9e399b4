"""Shared test settings: keep torch to few threads so the 2-core CI box stays responsive; a private ORT cache."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
# ONNX Runtime's optimised-graph cache (fsdeploy.engines.ort_cache) goes to a throw-away folder, not ~/.cache, and
# the folder goes when the run ends (0.4-3 GB per full run; they used to pile up in /tmp until the disk was full)
if "FSDEPLOY_ORT_CACHE" not in os.environ:
    os.environ["FSDEPLOY_ORT_CACHE"] = _cache = tempfile.mkdtemp(prefix="fsdeploy-ort-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.gpu tests when no CUDA device is visible."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA: no GPU
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def int8_resnet18(tmp_path_factory: pytest.TempPathFactory):
    """A tiny resnet18 bundle (32 px, realistic random weights, full-range INT8 graph) and real image folders.

    Shared by the OpenVINO and tune tests; tests that write to the bundle copy it first.
    """
    from types import SimpleNamespace

    from fsdeploy.bench.measure import write_photo_folder
    from fsdeploy.bundle import load_bundle
    from fsdeploy.pipeline.export import export_bundle
    from fsdeploy.pipeline.quantize import quantize_bundle
    from tests.helpers import glyph_folder, make_checkpoint

    tmp = tmp_path_factory.mktemp("int8-resnet18")
    ckpt = make_checkpoint("resnet18", tmp / "w.safetensors", img_size=32)
    plain, _ = export_bundle("resnet18", tmp / "plain", checkpoint=ckpt, validate=False)
    photos = write_photo_folder(tmp / "photos", classes=3, per_class=8, side=64, seed=0)
    quantize_bundle(plain, [photos], reduce_range=False)
    glyphs = glyph_folder(tmp / "glyphs", classes="ABCDEF", per_class=7, size=40)
    return SimpleNamespace(tmp=tmp, bundle=load_bundle(plain.path), photos=photos, glyphs=glyphs)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory):
    """A 32 px resnet18 bundle (realistic random weights, validated), glyph support/query folders and an NCC task.

    Shared by the CLI-convention and Python-API tests; tests that write to the bundle copy it first.
    """
    from types import SimpleNamespace

    from fsdeploy.runtime import adapt_task
    from tests.helpers import glyph_folder, tiny_bundle

    tmp = tmp_path_factory.mktemp("tiny-workspace")
    bundle = tiny_bundle(tmp, validate=True)
    ckpt = tmp / "w.safetensors"
    support = glyph_folder(tmp / "support", classes="ABC", per_class=4, seed=0)
    query = glyph_folder(tmp / "query", classes="ABC", per_class=2, seed=1)
    adapt_task(bundle, support, tmp / "task.npz", head="ncc")
    return SimpleNamespace(tmp=tmp, checkpoint=ckpt, bundle=bundle, path=tmp / "bundle", support=support, query=query,
                           task=tmp / "task.npz")
