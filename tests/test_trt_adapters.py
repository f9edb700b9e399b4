"""Adapter bundles (CaSE context/query/gamma/stages, later TOAST) build into TensorRT engines, FP32 and FP16.

An adapter that is not registered yet is skipped with a reason; once it is registered its graphs must
build, and a registered adapter without a case here fails `test_every_registered_adapter_has_a_case`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from fsdeploy.engines.build import build_bundle
from fsdeploy.engines.trt_records import PRECISIONS
from fsdeploy.adapters import exported_kinds
from tests.trt_cases import (
    BATCH,
    CASES,
    Built,
    build_case,
    check_engines_are_listed_with_their_hashes,
    check_fp16_graph_keeps_statistics_in_fp32,
    check_fp16_onnx_matches_fp32_on_real_images,
    check_layer_precisions_match_the_label,
    needs_trt,
)

pytestmark = needs_trt
ADAPTED = [c for c in CASES if c[1] != "none"]


@pytest.fixture(scope="module", params=ADAPTED, ids=[f"{m}-{a}" for m, a in ADAPTED])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    model, adapter = request.param
    return build_case(model, adapter, tmp_path_factory.mktemp(f"{model}-{adapter}"))


def test_every_registered_adapter_has_a_case() -> None:
    missing = sorted(set(exported_kinds()) - {a for _, a in CASES})  # fine-tuners export no graphs of their own
    assert not missing, f"adapters without a TensorRT build case: {missing}; add them to tests/trt_cases.py CASES"


def test_fp16_onnx_matches_fp32_on_real_images(built: Built) -> None:
    check_fp16_onnx_matches_fp32_on_real_images(built)


def test_fp16_graph_keeps_statistics_in_fp32(built: Built) -> None:
    check_fp16_graph_keeps_statistics_in_fp32(built)


def test_engines_are_listed_with_their_hashes(built: Built) -> None:
    check_engines_are_listed_with_their_hashes(built)


def test_layer_precisions_match_the_label(built: Built) -> None:
    check_layer_precisions_match_the_label(built)


@pytest.mark.slow
def test_every_case_graph_builds(tmp_path: Path) -> None:
    """All CaSE graphs, every chunked stage included, FP32 and FP16."""
    built = build_case("efficientnet_b0", "case", tmp_path)
    for precision in PRECISIONS:
        recs = build_bundle(built.bundle, precision=precision, batch=BATCH, opt_level=0)
        assert {r.graph for r in recs} == set(built.bundle.manifest.graphs)
        assert all(r.layer_precisions.get("fp16", 0) > 0 for r in recs) == (precision == "fp16")
