"""What an adapter kind's builder returns: the whole torch module and the graphs to export from it.

A builder (`fsdeploy.adapters.AdapterKind.build`) turns a `BuildRequest` (timm name, weights, image size)
into an `AdaptedModel`; `fsdeploy.pipeline.export` exports and validates its graphs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fsdeploy.backbones import BuildRequest, Preprocess
from fsdeploy.exporters.spec import ExportSpec


@dataclass(frozen=True)
class GraphExport:
    """One graph to export: the module with positional inputs in `spec.inputs` order.

    `feeds(images)` builds that graph's inputs from a batch of preprocessed images `(N, 3, H, W)`
    (for graphs with more inputs than images, e.g. CaSE's query graph, it computes them).
    `reference`, when given, is the plain module that `module` rewrites for speed (e.g. CaSE's fused
    query graph): export validation and eager baselines use it, so the rewrite itself is checked.
    """

    name: str
    module: Any
    spec: ExportSpec
    feeds: Callable[[np.ndarray], dict[str, np.ndarray]]
    file: str = ""
    reference: Any = None

    @property
    def eager(self) -> Any:
        """The module as written: `reference` if the exported one is a rewrite of it, else `module`."""
        return self.module if self.reference is None else self.reference

    @property
    def filename(self) -> str:
        return self.file or f"{self.name}.onnx"


@dataclass(frozen=True)
class AdaptedModel:
    """The whole torch module (its state_dict is the bundle's reference weights) and its graphs."""

    module: Any
    preprocess: Preprocess
    graphs: tuple[GraphExport, ...]
    extra: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[BuildRequest], AdaptedModel]


def images_only(images: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of a graph whose only input is `images`."""
    return {"images": images}
