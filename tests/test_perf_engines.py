"""Target 6's measures: every side is timed and the ratios are what the rows' throughputs give."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from fsdeploy.bench.perf_engines import SIDES, _int8_ort, engine_peer_throughput, matmul_peaks


@pytest.mark.slow  # ~20 s of timing on 2 cores; the default suite keeps the peak test below
def test_rows_and_ratios(int8_resnet18) -> None:
    images = sorted(int8_resnet18.photos.rglob("*.jpg"))
    rows = engine_peer_throughput(int8_resnet18.bundle, "resnet18", images, batches=(1, 2), threads=1, iters=1, rounds=1)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        ips = {k: r[f"{k}_ips"] for k in SIDES}
        assert all(v > 0 for v in ips.values()) and r["pre_ms"] > 0
        assert r["vs_torch_fp32"] == pytest.approx(max(ips["ort_fp32"], ips["openvino_default"]) / ips["torch_fp32"])
        assert r["vs_best_peer"] == pytest.approx(max(ips["ort_fp32"], ips["openvino_default"]) / max(ips["torch_fp32"], ips["torch_bf16_cl"]))


def test_int8_peak_computes_the_exact_product() -> None:
    run = _int8_ort(1, 64)
    out = run()[0]
    a, b = run.feeds["a"].astype(np.int64), run.feeds["b"].astype(np.int64)
    np.testing.assert_array_equal(out, a @ b)  # u8 x s8 summed exactly in int32: the timed kernel does real work
    peaks = matmul_peaks(1, calls=1, size=128)
    assert all(v > 0 for k, v in peaks.items() if not np.isnan(v))
    assert peaks["int8_gmacs_s"] == max(peaks["int8_torch_gmacs_s"], peaks["int8_ort_gmacs_s"])
