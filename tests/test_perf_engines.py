"""Target 6's measures: every side is timed and the ratios are what the rows' throughputs give."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from fsdeploy.bench.perf_engines import OURS, SIDES, _int8_ort, chosen_engine, engine_peer_throughput, matmul_peaks


@pytest.mark.slow  # ~20 s of timing on 2 cores; the default suite keeps the peak test below
def test_rows_and_ratios(int8_resnet18) -> None:
    images = sorted(int8_resnet18.photos.rglob("*.jpg"))
    rows = engine_peer_throughput(int8_resnet18.bundle, "resnet18", images, batches=(1, 2), threads=1, iters=1, rounds=1)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        ips = {k: r[f"{k}_ips"] for k in SIDES if f"{k}_ips" in r}
        assert set(SIDES) - set(ips) <= {"openvino_bf16_mixed"}  # that one needs a bf16 CPU
        assert all(v > 0 for v in ips.values()) and r["pre_ms"] > 0 and r["torch_pre_ms"] > 0
        model = {k: r[f"{k}_model_ms"] for k in ips}
        assert model["torch_fp32"] == pytest.approx(1e3 * r["batch"] / ips["torch_fp32"] - r["torch_pre_ms"])
        assert r["vs_torch_fp32_model"] == pytest.approx(model["torch_fp32"] / min(v for k, v in model.items() if k in OURS))
        ours = max(v for k, v in ips.items() if k in OURS)
        assert r["vs_torch_fp32"] == pytest.approx(ours / ips["torch_fp32"])
        assert r["vs_best_peer"] == pytest.approx(ours / max(ips["torch_fp32"], ips["torch_bf16_cl"]))


def test_the_chosen_engine_is_the_fastest_that_passes_the_decision_gate() -> None:
    """Target 6 reads the engine `fsdeploy tune` would pick: a faster side that fails the gate does not count."""
    from fsdeploy.bench.perf import AGREEMENT, _gated_sides

    ips = {"ort_fp32": 10.0, "openvino_default": 40.0, "openvino_bf16_mixed": 30.0, "torch_fp32": 5.0, "torch_bf16_cl": 8.0}
    model_ms = {"ort_fp32": 90.0, "openvino_default": 20.0, "openvino_bf16_mixed": 30.0, "torch_fp32": 180.0, "torch_bf16_cl": 100.0}
    row = {**{f"{k}_ips": v for k, v in ips.items()}, **{f"{k}_model_ms": v for k, v in model_ms.items()}}
    bf16_fails = {"bf16": AGREEMENT - 0.01, "bf16-mixed": AGREEMENT}
    passing = _gated_sides(bf16_fails, bf16=True)
    assert passing == {"ort_fp32", "openvino_bf16_mixed"}
    # model time ratio 180 / 30, throughput ratio 30 / 8 against the faster peer
    assert chosen_engine(row, passing) == ("openvino_bf16_mixed", 6.0, 3.75)
    assert chosen_engine(row, _gated_sides({"bf16": 1.0, "bf16-mixed": 1.0}, bf16=True)) == ("openvino_default", 9.0, 5.0)
    assert chosen_engine(row, _gated_sides({}, bf16=True)) == ("ort_fp32", 2.0, 1.25)  # nothing measured: the reference
    assert _gated_sides({}, bf16=False) == {"ort_fp32", "openvino_default"}  # no bf16: OpenVINO's default is f32


def test_int8_peak_computes_the_exact_product() -> None:
    run = _int8_ort(1, 64)
    out = run()[0]
    a, b = run.feeds["a"].astype(np.int64), run.feeds["b"].astype(np.int64)
    np.testing.assert_array_equal(out, a @ b)  # u8 x s8 summed exactly in int32: the timed kernel does real work
    peaks = matmul_peaks(1, calls=1, size=128)
    assert all(v > 0 for k, v in peaks.items() if not np.isnan(v))
    assert peaks["int8_gmacs_s"] == max(peaks["int8_torch_gmacs_s"], peaks["int8_ort_gmacs_s"])
