"""Plain-backbone bundles (CNNs and a ViT) build into TensorRT engines on CPU, FP32 and FP16, dynamic batch."""
from __future__ import annotations

import pytest

from tests.trt_cases import (
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
PLAIN = [c for c in CASES if c[1] == "none"]


@pytest.fixture(scope="module", params=PLAIN, ids=[m for m, _ in PLAIN])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    model, adapter = request.param
    return build_case(model, adapter, tmp_path_factory.mktemp(model))


def test_fp16_onnx_matches_fp32_on_real_images(built: Built) -> None:
    check_fp16_onnx_matches_fp32_on_real_images(built)


def test_fp16_graph_keeps_statistics_in_fp32(built: Built) -> None:
    check_fp16_graph_keeps_statistics_in_fp32(built)


def test_engines_are_listed_with_their_hashes(built: Built) -> None:
    check_engines_are_listed_with_their_hashes(built)


def test_layer_precisions_match_the_label(built: Built) -> None:
    check_layer_precisions_match_the_label(built)
