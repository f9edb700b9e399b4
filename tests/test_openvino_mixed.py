"""OpenVINO `bf16-mixed` and the bf16 CaSE stage state, against ONNX Runtime FP32 on real images.

References are plain onnxruntime sessions (independent of fsdeploy's engines). The last test runs the shipped
glyph efficientnet_b0 on the glyph corpus's images that plain bf16 distorts most (`data/glyphs` or
`FSDEPLOY_GLYPHS`, made by `fsdeploy data glyphs`; skipped without it; a few seconds).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from fsdeploy.data.folders import list_images
from fsdeploy.data.images import load_checked
from fsdeploy.engines import EngineOptions
from fsdeploy.engines.openvino import KEEP_F32, OpenVinoEngine, OpenVinoOptions, mark_f32, mixed_f32_layers
from fsdeploy.runtime import open_graph
from tests.test_openvino import _bf16_here, _close, _ort, ws  # noqa: F401  (ws: the shared resnet18 fixture)

needs_bf16 = pytest.mark.skipif(not _bf16_here(), reason="this CPU has no bf16 (AVX512-BF16 or AMX)")


def test_mark_f32_marks_only_the_named_layers() -> None:
    xml = ('<net><layers><layer id="0" name="a" type="Convolution"><data/></layer>'
           '<layer id="1" name="b &amp; c" type="Add"><rt_info><attribute name="fused_names" version="0" value="x"/></rt_info></layer>'
           '<layer id="2" name="d" type="Convolution"/></layers></net>')
    out, count = mark_f32(xml, {"a", "b & c"})
    assert count == 2 and out.count(KEEP_F32) == 2
    assert '<layer id="2" name="d" type="Convolution"/>' in out  # a self-closed layer not named: untouched
    assert 'value="x"/>' in out and out.index(KEEP_F32) < out.index('name="b &amp; c"') + 200


@needs_bf16
def test_bf16_mixed_keeps_high_resolution_convs_f32(ws) -> None:  # noqa: F811
    import openvino as ov

    model = ov.Core().read_model(str(ws.plain.graph_path("features")))
    kept = set(mixed_f32_layers(model))
    convs = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")]
    high = [op for op in convs if op.get_output_partial_shape(0)[2].get_length() * 8 >= 32]
    assert high and {op.get_friendly_name() for op in high} <= kept and len(high) < len(convs)
    ref = _ort(ws.plain.graph_path("features"), {"images": ws.images})["features"]
    with open_graph(ws.plain, "features", "openvino", EngineOptions(precision="bf16-mixed")) as eng:
        counts = eng.kernel_precisions()
        got = eng.run({"images": ws.images})["features"]
    # what the plugin really ran: the marked convolutions in f32, the rest in bf16
    assert counts.get("Convolution f32") == sum(op.get_friendly_name() in kept for op in convs), counts
    assert counts.get("Convolution bf16", 0) == len(convs) - counts["Convolution f32"] > 0
    _close(got, ref, "bf16")


WORST = ("U+10D1_georgian/freeserif.png", "U+056C_armenian/dejavu-sans-mono.png", "U+0582_armenian/dejavu-sans.png")


@needs_bf16
def test_shipped_glyph_backbone_bf16_mixed_repairs_the_worst_images(tmp_path) -> None:
    """The images plain bf16 distorts most on the shipped backbone (centred cosine 0.13-0.45 against FP32 in
    `bench perf --targets 6`): bf16-mixed brings every sampled image back near FP32."""
    corpus = Path(os.environ.get("FSDEPLOY_GLYPHS", Path(__file__).resolve().parents[1] / "data" / "glyphs"))
    if not all((corpus / w).is_file() for w in WORST):
        pytest.skip(f"no glyph corpus at {corpus} (fsdeploy data glyphs)")
    from fsdeploy.agreement import centred_cosines
    from fsdeploy.pipeline.export import export_bundle
    from fsdeploy.weights import default_checkpoint

    b, _ = export_bundle("efficientnet_b0", tmp_path / "b", checkpoint=default_checkpoint(), img_size=32, validate=False)
    others = sorted(p for p in corpus.glob("U+05*_armenian/*.png"))[:60]
    paths = [corpus / w for w in WORST] + others
    x = load_checked(paths, b.manifest.preprocess)
    ref = _ort(b.graph_path("features"), {"images": x})["features"]
    mean = ref.astype(np.float64).mean(0)
    cos = {}
    for precision in ("bf16", "bf16-mixed"):
        with OpenVinoEngine(b.graph_path("features"), OpenVinoOptions(precision=precision)) as eng:
            cos[precision] = centred_cosines(eng.run({"images": x})["features"], ref, mean)
    assert cos["bf16"][:3].min() < 0.7  # the failure being fixed (if OpenVINO stops distorting these, re-measure)
    assert cos["bf16-mixed"].min() > 0.9 and cos["bf16-mixed"][:3].min() > cos["bf16"][:3].min() + 0.2
