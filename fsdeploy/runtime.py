"""How each adapter kind turns images into features on the device, through engines only.

A feature path has two halves: `support` runs once per task (and may produce task state, e.g. CaSE's
γ), `query` runs per request with that state. The per-adapter choice lives in this table, not in callers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from fsdeploy.engines import Engine, EngineOptions, open_engine
from fsdeploy.engines import openvino as _openvino  # noqa: F401 - registers "openvino" (the package loads on open)
from fsdeploy.errors import UnknownName
from fsdeploy.exporters.bundle import Bundle


class FeaturePath(Protocol):
    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Features `(N, D)` of all support batches, and the task state to store."""
        ...

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """Features `(B, D)` of one query batch given the stored task state."""
        ...

    def close(self) -> None: ...


@dataclass
class _Engines:
    """Open each graph once, on first use."""

    bundle: Bundle
    backend: str
    options: EngineOptions
    opened: dict[str, Engine] = field(default_factory=dict)
    overrides: dict[str, EngineOptions] = field(default_factory=dict)  # per-graph options

    def __call__(self, graph: str) -> Engine:
        if graph not in self.opened:
            self.opened[graph] = open_engine(self.bundle, graph, self.backend, self.overrides.get(graph, self.options))
        return self.opened[graph]

    def release(self, graph: str) -> None:
        """Close one graph's engine once a pass no longer needs it (keeps peak memory to one stage)."""
        engine = self.opened.pop(graph, None)
        if engine is not None:
            engine.close()

    def close(self) -> None:
        for e in self.opened.values():
            e.close()
        self.opened.clear()


class PlainPath:
    """One `features` graph for support and query (adapter none, toast)."""

    def __init__(self, bundle: Bundle, backend: str, options: EngineOptions) -> None:
        self.engines = _Engines(bundle, backend, options)

    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feats = [self.query(b, {}) for b in batches]
        return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32), {}

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        return self.engines("features").run({"images": images})["features"]

    def close(self) -> None:
        self.engines.close()


class CasePath:
    """UpperCaSE: the context pass over all support batches gives γ; queries feed γ to the query graph."""

    def __init__(self, bundle: Bundle, backend: str, options: EngineOptions, *, chunked: bool | None = None) -> None:
        self.engines = _Engines(bundle, backend, options)
        # The stage graphs run back to back and are released when the pass ends, so their ORT workers may
        # busy-wait between runs without stealing the cores from later work (10-15% faster, 100 images).
        stages = bundle.manifest.extra.get("chunked", {}).get("stages", [])
        self.engines.overrides = {name: replace(options, spinning=options.spinning or "always") for name in stages}
        self.extra = bundle.manifest.extra
        self.chunked = chunked

    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from fsdeploy.modules.case_context import context_pass

        feats, gamma = context_pass(self.engines, batches, self.extra, chunked=self.chunked, release=self.engines.release)
        return feats, {"gamma": gamma}

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        from fsdeploy.modules.case_context import query_pass

        return query_pass(self.engines("query"), images, state["gamma"], self.extra)

    def close(self) -> None:
        self.engines.close()


class TaskGraphPath:
    """A task that carries its own graph (TSA / BN-affine folded weights): support and query both use it."""

    def __init__(self, graph: bytes, options: EngineOptions) -> None:
        from fsdeploy.engines.ort import OrtEngine, OrtOptions

        self.engine = OrtEngine(graph, OrtOptions(providers=options.providers, threads=options.threads))

    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return np.concatenate([self.query(b, {}) for b in batches]), {}

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        return self.engine.run({"images": images})["features"]

    def close(self) -> None:
        self.engine.close()


PATHS: dict[str, Callable[..., FeaturePath]] = {"none": PlainPath, "toast": PlainPath, "case": CasePath}


def feature_path(
    bundle: Bundle,
    backend: str = "ort",
    options: EngineOptions | None = None,
    task_state: dict[str, np.ndarray] | None = None,
    **kw: Any,
) -> FeaturePath:
    """The feature path for the bundle's adapter kind, or the task's own folded graph when it has one."""
    if task_state and "graph" in task_state:
        if options is not None and options.precision != "fp32":
            raise UnknownName(f"tasks with folded weights run their own fp32 graph; drop --precision {options.precision}")
        if backend != "ort":
            raise UnknownName(f"tasks with folded weights run their own ONNX graph on ort; got backend {backend!r}")
        return TaskGraphPath(task_state["graph"].tobytes(), options or EngineOptions())
    adapter = bundle.manifest.adapter
    if adapter not in PATHS:
        raise UnknownName(f"bundle {bundle.path} uses adapter {adapter!r}, which this fsdeploy cannot run; known: {', '.join(sorted(PATHS))}")
    return PATHS[adapter](bundle, backend, options or EngineOptions(), **kw)
