"""ONNX Runtime spinning modes: "run" (the default) stops busy-waiting the moment a run returns, so an open
query session leaves the cores to preprocessing and the head fit; every mode computes the same outputs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fsdeploy.engines.ort import OrtEngine, OrtOptions
from fsdeploy.errors import UnknownName
from tests.test_ort_cache import CPU, _conv_net


def _idle_cpu_after_run(engine: OrtEngine, x: np.ndarray, idle_s: float = 0.1) -> float:
    """CPU seconds this process burns while the caller sleeps right after a run (max of 3 tries)."""
    worst = 0.0
    for _ in range(3):
        engine.run({"x": x})
        start = time.process_time()
        time.sleep(idle_s)
        worst = max(worst, time.process_time() - start)
    return worst


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Path:
    return _conv_net(tmp_path_factory.mktemp("spin") / "net.onnx")


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((256, 8, 16, 16)).astype(np.float32)  # big enough to use both threads


def test_run_mode_leaves_no_spinning_after_the_run(net: Path, x: np.ndarray) -> None:
    spin_always = _idle_cpu_after_run(OrtEngine(net, OrtOptions(providers=CPU, threads=2, spinning="always")), x)
    during_run = _idle_cpu_after_run(OrtEngine(net, OrtOptions(providers=CPU, threads=2)), x)
    assert OrtOptions().spinning == "run"
    assert during_run < 0.01, f"workers kept spinning after the run: {during_run:.3f} s of CPU in 0.1 s idle"
    # the probe sees spinning when there is some (idle box: 0.04-0.06 s against 0.0001 s)
    assert spin_always > during_run


def test_every_mode_computes_the_same(net: Path, x: np.ndarray) -> None:
    outs = [OrtEngine(net, OrtOptions(providers=CPU, threads=2, spinning=m)).run({"x": x[:2]})["y"] for m in ("off", "run", "always")]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_unknown_mode_is_refused(net: Path) -> None:
    with pytest.raises(UnknownName, match="spinning must be one of off, run, always; got 'sometimes'"):
        OrtEngine(net, OrtOptions(providers=CPU, spinning="sometimes"))
