"""Open a bundle graph on a backend: resolve it to a source, then `open_engine` (the convenience callers use).

The torch backend's source is the bundle's rebuilt module; rebuilding (timm create + tracing the CaSE
stages) takes seconds, so it is cached per bundle (keyed by folder and bundle id): a CaSE adaptation opens
about 22 graphs and rebuilds the CaseNet once.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fsdeploy.bundle import Bundle, GraphSource, TorchModule, resolve
from fsdeploy.engines import Engine, EngineOptions, backend_info, check_precision, open_engine

_TORCH_CACHE: dict[tuple[Path, str], dict[str, Any]] = {}
_TORCH_CACHE_MAX = 4  # bundles whose rebuilt modules stay in memory


def torch_graphs(bundle: Bundle) -> dict[str, Any]:
    """The bundle's graphs as torch modules (`GraphExport`s) with the exported weights, cached per bundle."""
    from fsdeploy.exporters.rebuild import torch_graphs as rebuild

    key = (Path(bundle.path).resolve(), bundle.manifest.bundle_id)
    if key not in _TORCH_CACHE:
        if len(_TORCH_CACHE) >= _TORCH_CACHE_MAX:
            _TORCH_CACHE.pop(next(iter(_TORCH_CACHE)))
        _TORCH_CACHE[key] = rebuild(bundle)
    return _TORCH_CACHE[key]


def graph_source(bundle: Bundle, graph: str, backend: str = "ort", precision: str = "fp32") -> GraphSource:
    """The source of `graph` for `backend` (with the rebuilt module attached for torch)."""
    info = backend_info(backend)
    check_precision(info, precision)  # before looking for a variant: the error says where the precision runs
    source = resolve(bundle, graph, info.source_precision(precision), info.kind)
    if info.kind == "torch":
        g = torch_graphs(bundle)[graph]
        source = replace(source, torch=TorchModule(g.module, tuple(g.spec.inputs), tuple(g.spec.outputs)))
    return source


def open_graph(bundle: Bundle, graph: str, backend: str = "ort", options: EngineOptions | None = None) -> Engine:
    """Open one graph of a loaded bundle on `backend` at `options.precision`."""
    options = options or EngineOptions()
    return open_engine(graph_source(bundle, graph, backend, options.precision), backend, options)


@dataclass
class GraphOpener:
    """Open each graph of one bundle once, on first use; close them together (feature paths hold one)."""

    bundle: Bundle
    backend: str = "ort"
    options: EngineOptions = field(default_factory=EngineOptions)
    overrides: Mapping[str, EngineOptions] = field(default_factory=dict)  # per-graph options
    opened: dict[str, Engine] = field(default_factory=dict)

    def __call__(self, graph: str) -> Engine:
        if graph not in self.opened:
            self.opened[graph] = open_graph(self.bundle, graph, self.backend, self.overrides.get(graph, self.options))
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
