"""Engine.run_into checks each call signature once: repeated calls skip the checks, bad calls still fail."""
from __future__ import annotations

import numpy as np
import pytest

from fsdeploy.engines import base
from fsdeploy.engines.base import Engine, TensorSpec
from fsdeploy.errors import EngineError


class Doubler(Engine):
    """y = 2x on float32 (n, 3); counts what reaches the backend and how often checks ran."""

    name = "doubler"

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def input_specs(self) -> dict[str, TensorSpec]:
        return {"x": TensorSpec(("batch", 3))}

    def output_specs(self) -> dict[str, TensorSpec]:
        return {"y": TensorSpec(("batch", 3))}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(feeds)
        return {"y": feeds["x"] * 2}


@pytest.fixture
def counted_checks(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = base.check_feeds

    def counting(engine, specs, feeds):
        seen.append(engine)
        return real(engine, specs, feeds)

    monkeypatch.setattr(base, "check_feeds", counting)
    return seen


def test_repeated_signature_is_checked_once(counted_checks) -> None:
    eng = Doubler()
    for i in range(3):
        x = np.full((2, 3), float(i), np.float32)
        y = np.empty((2, 3), np.float32)
        eng.run_into({"x": x}, {"y": y})
        np.testing.assert_array_equal(y, 2 * x)
    assert len(counted_checks) == 1 and len(eng.calls) == 3
    eng.run_into({"x": np.ones((4, 3), np.float32)}, {"y": np.empty((4, 3), np.float32)})  # new shape: checked
    assert len(counted_checks) == 2


def test_bad_calls_fail_after_a_good_one_was_remembered() -> None:
    eng = Doubler()
    eng.run_into({"x": np.ones((2, 3), np.float32)}, {"y": np.empty((2, 3), np.float32)})
    with pytest.raises(EngineError, match="input 'x' has shape"):
        eng.run_into({"x": np.ones((2, 4), np.float32)}, {"y": np.empty((2, 3), np.float32)})
    with pytest.raises(EngineError, match="buffer for output 'y'"):
        eng.run_into({"x": np.ones((2, 3), np.float32)}, {"y": np.empty((2, 3), np.float64)})
    with pytest.raises(EngineError, match="buffer for output 'y'"):
        eng.run_into({"x": np.ones((2, 3), np.float32)}, {"y": np.empty((3, 2), np.float32).T})


def test_converted_feeds_are_checked_every_time(counted_checks) -> None:
    """A feed that needs converting (float64, or not contiguous) is never remembered, so it is converted each call."""
    eng = Doubler()
    for _ in range(2):
        eng.run_into({"x": np.ones((2, 3), np.float64)}, {"y": np.empty((2, 3), np.float32)})
        assert eng.calls[-1]["x"].dtype == np.float32
    strided = np.ones((2, 6), np.float32)[:, ::2]
    for _ in range(2):
        eng.run_into({"x": strided}, {"y": np.empty((2, 3), np.float32)})
        assert eng.calls[-1]["x"].flags.c_contiguous
    assert len(counted_checks) == 4
