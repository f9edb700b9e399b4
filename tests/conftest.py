"""Shared test settings: keep torch to few threads so the 2-core CI box stays responsive; a private ORT cache."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
# ONNX Runtime's optimised-graph cache (fsdeploy.engines.ort_cache) goes to a throw-away folder, not ~/.cache
os.environ.setdefault("FSDEPLOY_ORT_CACHE", tempfile.mkdtemp(prefix="fsdeploy-ort-cache-"))

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
