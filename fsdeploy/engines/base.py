"""One engine interface for every backend (ONNX Runtime, PyTorch, TensorRT).

Callers never branch on the backend: they call `run(feeds)` with a name -> array mapping. Input
checking lives here once, so each backend only implements `_run`.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsdeploy.errors import EngineError


@dataclass(frozen=True)
class TensorSpec:
    """Shape with named dynamic axes (str) and a numpy dtype name."""

    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(tuple(d["shape"]), str(d.get("dtype", "float32")))


class Engine(ABC):
    """A runnable graph. Use as a context manager; `run` checks names, dtypes and static dims first."""

    name: str = "engine"
    last_run_ms: float = float("nan")

    @abstractmethod
    def input_specs(self) -> dict[str, TensorSpec]:
        """Expected inputs by name."""

    @abstractmethod
    def output_specs(self) -> dict[str, TensorSpec]:
        """Produced outputs by name."""

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend hook: feeds already checked and contiguous."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on `feeds` (name -> array) and return outputs by name.

        Raises:
            EngineError: a missing or unexpected input name, wrong dtype, rank or static dimension.
        """
        checked = check_feeds(self.name, self.input_specs(), feeds)
        start = time.perf_counter()
        out = self._run(checked)
        self.last_run_ms = (time.perf_counter() - start) * 1e3
        return out

    def close(self) -> None:
        """Free backend resources (sessions, contexts)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_feeds(engine: str, specs: Mapping[str, TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return feeds as contiguous arrays of the expected dtype, or raise a message naming engine and tensor."""
    missing = sorted(set(specs) - set(feeds))
    extra = sorted(set(feeds) - set(specs))
    if missing or extra:
        raise EngineError(
            f"{engine}: inputs {sorted(feeds)} do not match the graph's {sorted(specs)}"
            f"{'; missing ' + ', '.join(missing) if missing else ''}{'; unexpected ' + ', '.join(extra) if extra else ''}"
        )
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        arr = np.asarray(feeds[name])
        if arr.dtype != np.dtype(spec.dtype):
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise EngineError(f"{engine}: input {name!r} has dtype {arr.dtype}, expected {spec.dtype}")
            arr = arr.astype(spec.dtype)
        if arr.ndim != len(spec.shape):
            raise EngineError(f"{engine}: input {name!r} has shape {arr.shape}, expected {tuple(spec.shape)}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise EngineError(
                    f"{engine}: input {name!r} has shape {arr.shape}, expected {tuple(spec.shape)} (axis {axis} must be {want})"
                )
        out[name] = np.ascontiguousarray(arr)
    return out
