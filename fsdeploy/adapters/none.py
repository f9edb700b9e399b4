"""The `none` adapter kind: the frozen backbone alone (images -> pooled features); per-task parts are heads."""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter
from fsdeploy.backbones import BuildRequest, create_backbone
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport, images_only
from fsdeploy.exporters.spec import ExportSpec


def build_plain(request: BuildRequest) -> AdaptedModel:
    """The frozen backbone alone: images -> pooled features."""
    model, pre = create_backbone(
        request.model, checkpoint=request.checkpoint, pretrained=request.pretrained, img_size=request.img_size
    )
    return AdaptedModel(model, pre, (GraphExport("features", model, ExportSpec(), images_only),))


def plain_path(bundle: Any, backend: str, options: Any, **_: Any) -> Any:
    from fsdeploy.runtime.paths import PlainPath

    return PlainPath(bundle, backend, options)


def count_plain(model: Any, size: int) -> Any:
    """The plain backbone's counts, plus TSA's adapter network where the family has a TSA rule and eTT's
    counts on a ViT."""
    from dataclasses import replace

    from fsdeploy.bench.cost_inputs import measure_ett, measure_tsa
    from fsdeploy.bench.costs import measure_backbone

    return replace(measure_backbone(model, size), tsa=measure_tsa(model, size), ett=measure_ett(model, size))


KIND = register_adapter(AdapterKind(
    name="none",
    summary="the frozen backbone; per-task heads (NCC, SimpleShot, linear, ...) fitted in numpy on its features",
    build=build_plain,
    feature_path=plain_path,
    count=count_plain,
    default_heads=("ncc", "simpleshot", "linear", "linear-newton"),
))
