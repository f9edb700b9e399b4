"""One engine interface for every backend (ONNX Runtime, PyTorch, TensorRT).

Callers never branch on the backend: they call `run(feeds)` with a name -> array mapping. Input
checking lives here once, so each backend only implements `_run`.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from fsdeploy.bundle.manifest import TensorSpec
from fsdeploy.errors import EngineError

UNKNOWN_SHAPE = ("?",)  # an output whose shape the engine cannot tell before running (PyTorch modules)


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

    def run_into(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Run the graph and write the named outputs into the caller's arrays (C-contiguous, exact shapes).

        Why: a caller that runs many times (the CaSE stage chain) keeps its buffers and so avoids a fresh
        allocation, page faults and a copy per run. Outputs left out are discarded.

        Raises:
            EngineError: bad feeds (as `run`), an unknown output name, or an output array of the wrong
                dtype, layout or shape.
        """
        key = _call_signature(feeds, outputs)
        seen = self.__dict__.setdefault("_checked_calls", set())
        checked = dict(feeds)
        if key is None or key not in seen:  # a signature checked before needs no second check
            checked = self._check_into(feeds, outputs)
            if key is not None and len(seen) < MAX_CHECKED_CALLS and all(checked[n] is feeds[n] for n in checked):
                seen.add(key)  # the feeds passed unchanged: the same signature will pass again
        start = time.perf_counter()
        self._run_into(checked, dict(outputs))
        self.last_run_ms = (time.perf_counter() - start) * 1e3

    def _check_into(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run_into`'s checks: the feeds as `run` checks them, and every output buffer against its spec."""
        checked = check_feeds(self.name, self.input_specs(), feeds)
        specs = self.output_specs()
        for name, arr in outputs.items():
            spec = specs.get(name)
            if spec is None:
                raise EngineError(f"{self.name}: no output {name!r}; outputs are {sorted(specs)}")
            known = spec.shape != UNKNOWN_SHAPE
            if arr.dtype != np.dtype(spec.dtype) or not arr.flags.c_contiguous or known and (arr.ndim != len(spec.shape) or any(
                isinstance(want, int) and want >= 0 and got != want for got, want in zip(arr.shape, spec.shape)
            )):
                raise EngineError(
                    f"{self.name}: buffer for output {name!r} is {arr.dtype}{arr.shape}; "
                    f"expected a C-contiguous {spec.dtype}{tuple(spec.shape)}"
                )
        return checked

    def _run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Backend hook for `run_into`; this default runs and copies (ONNX Runtime binds the buffers)."""
        result = self._run(feeds)
        for name, arr in outputs.items():
            if result[name].shape != arr.shape:
                raise EngineError(f"{self.name}: buffer for output {name!r} is {arr.shape}; the output is {result[name].shape}")
            np.copyto(arr, result[name])

    def close(self) -> None:
        """Free backend resources (sessions, contexts)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_CHECKED_CALLS = 256  # call signatures remembered per engine (the CaSE pass makes a few per graph)


def _call_signature(feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What `run_into`'s checks depend on: name, dtype, shape and C-contiguity of every array; None
    when some feed is not an ndarray (it may need converting, so it is checked every time)."""
    parts = []
    for group in (feeds, outputs):
        for name, arr in group.items():
            if type(arr) is not np.ndarray:
                return None
            parts.append((name, arr.dtype.str, arr.shape, arr.flags.c_contiguous))
        parts.append(None)  # separates feeds from outputs
    return tuple(parts)


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
