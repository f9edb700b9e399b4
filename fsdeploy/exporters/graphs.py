"""What each adapter kind exports: a registry from adapter name to a builder of torch graphs.

A builder turns a build request (timm name, weights, image size) into the whole torch module plus the
graphs to export from it. `none` lives here; CaSE and TOAST register their own builders.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.backbones import Preprocess, create_backbone
from fsdeploy.errors import RegistryError, UnknownName
from fsdeploy.exporters.spec import ExportSpec


@dataclass(frozen=True)
class BuildRequest:
    """Where the weights come from and at what resolution."""

    model: str
    checkpoint: Path | None = None
    pretrained: bool = False
    img_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific structure (e.g. TOAST LoRA rank)


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
ADAPTERS: dict[str, Builder] = {}


def register_adapter(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding an adapter builder under `name`."""

    def add(fn: Builder) -> Builder:
        if name in ADAPTERS:
            raise RegistryError(f"adapter {name!r} registered twice")
        ADAPTERS[name] = fn
        return fn

    return add


def load_builtin_adapters() -> None:
    """Import the modules that register adapter builders (kept lazy: they pull in torch blocks)."""
    import importlib

    for mod in ("fsdeploy.modules.case_export", "fsdeploy.modules.toast_export"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def build_adapted(adapter: str, request: BuildRequest) -> AdaptedModel:
    """Run the builder registered for `adapter`."""
    load_builtin_adapters()
    if adapter not in ADAPTERS:
        raise UnknownName(f"unknown adapter {adapter!r}; known: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[adapter](request)


def images_only(images: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of a graph whose only input is `images`."""
    return {"images": images}


@register_adapter("none")
def build_plain(request: BuildRequest) -> AdaptedModel:
    """The frozen backbone alone: images -> pooled features."""
    model, pre = create_backbone(
        request.model, checkpoint=request.checkpoint, pretrained=request.pretrained, img_size=request.img_size
    )
    return AdaptedModel(model, pre, (GraphExport("features", model, ExportSpec(), images_only),))
