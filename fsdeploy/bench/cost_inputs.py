"""Count, on a bundle's own torch modules, every per-image number the adaptation-cost model combines.

`fsdeploy.bench.costs` turns per-image MACs into per-method costs (UpperCaSE, Patacchiola et al.,
NeurIPS 2022, Fig. 1). This module measures those MACs on the bundle's graphs rebuilt with the exported
weights, so `fsdeploy bench macs` prints counts, never constants:

- every bundle: the plain backbone's forward, and forward + backward of full, partial and BN-affine
  fine-tuning (`measure_backbone`);
- ResNet family: TSA's adapter network (Li et al., CVPR 2022; `fsdeploy.modules.adapters`) with its β
  alignment, α and β trained;
- ViT family: eTT's prefix ViT (`fsdeploy.modules.ett.EttCounts`: per image, per prefix token, per task);
- `case` bundles: the query graph per image (the context pass does the same arithmetic per image), the CaSE
  MLPs once per task (the `case_gamma` graph) and the γ length;
- `toast` bundles: the tuned network's inference MACs (TOAST, Shi et al.; tuned per dataset, not per task).

Feature transforms (SimpleShot's CL2N) are costed by the transforms' own `macs` and `n_params`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsdeploy.bench.costs import (
    DEFAULT_METHODS,
    CaseCounts,
    CostRow,
    CountedMacs,
    Method,
    TaskShape,
    TrainedGraph,
    adaptation_costs,
    measure_trained,
    missing_counts,
)
from fsdeploy.bench.macs import count_macs
from fsdeploy.errors import UnknownName
from fsdeploy.bundle import Bundle
from fsdeploy.modules.ett import EttCounts

def why_missing() -> dict[str, str]:
    """What a method lacks, in words a user can act on, keyed by the CountedMacs field it needs (from the
    adapter kinds' `why_missing`)."""
    from fsdeploy.adapters import ADAPTERS

    return {k.name: k.why_missing for k in ADAPTERS.values() if k.why_missing}


def transform_macs(name: str, rows: int, dim: int) -> int:
    """MACs of applying feature transform `name` to `rows` features of size `dim` (fitting one costs none)."""
    from fsdeploy.heads import make_transform

    return int(make_transform(name).macs(rows, dim))


def transform_params(name: str, dim: int) -> int:
    """Numbers transform `name` fits per task (CL2N without a fixed centre: the support mean, D)."""
    from fsdeploy.heads import make_transform

    return int(make_transform(name).n_params(dim))


def torch_model(bundle: Bundle) -> nn.Module:
    """The bundle's whole torch module (e.g. the CaseNet) carrying exactly the exported weights.

    `fsdeploy.exporters.rebuild.torch_graphs` returns the graphs cut from this module; counting the
    fine-tuning recipes needs the module itself (its block structure names the partial fine-tuning set).
    """
    from fsdeploy.exporters.rebuild import torch_model as rebuilt

    return rebuilt(bundle)


def measure_tsa(backbone: nn.Module, image_size: int) -> TrainedGraph | None:
    """TSA's training graph (adapters + β) at batch 1, α and β trained; None when the family has no TSA rule."""
    from fsdeploy.modules.adapters import alignment_map, with_adapters

    try:
        adapted = with_adapters(backbone)
    except UnknownName:
        return None
    dim = int(backbone.num_features)
    net = nn.Sequential(adapted, alignment_map(dim))  # parameter names: "0.<backbone>...", "1.weight" (β)
    x = torch.zeros(1, 3, image_size, image_size)
    return measure_trained(net, x, lambda name: name.endswith(".alpha.weight") or name == "1.weight")


def measure_ett(backbone: nn.Module, image_size: int) -> EttCounts | None:
    """eTT's counts of a plain timm ViT (Xu et al., TMLR 2023); None for other backbones (eTT is ViT-only)."""
    from fsdeploy.errors import InvalidInput

    try:
        return EttCounts.of(backbone, image_size)
    except InvalidInput:
        return None


def measure_case(net: Any, image_size: int) -> CaseCounts:
    """CaSE counts of a CaseNet: query-graph MACs per image, MLP MACs per task, γ length."""
    x = torch.zeros(1, 3, image_size, image_size)
    g = int(net.gamma_size)
    forward = count_macs(net.query_module(), (x, torch.ones(g))).total
    mlp = count_macs(net.gamma_module(), torch.zeros(g)).total
    return CaseCounts(forward=forward, mlp=mlp, gamma=g)


def _counter(adapter: str) -> Callable[[nn.Module, int], CountedMacs]:
    """The adapter kind's counter of its rebuilt torch module (`AdapterKind.count`)."""
    from fsdeploy.adapters import ADAPTERS

    kind = ADAPTERS.get(adapter)
    if kind.count is None:
        raise UnknownName(f"cannot count MACs of adapter {adapter!r}; it has no counter (AdapterKind.count)")
    return kind.count


def count_bundle(bundle: Bundle) -> CountedMacs:
    """Every per-image count of the bundle's adapter kind, on its rebuilt torch module.

    Raises:
        UnknownName: an adapter kind this module cannot count.
    """
    counter = _counter(bundle.manifest.adapter)
    size = int(bundle.manifest.preprocess.input_size[-1])
    with torch.no_grad():
        return counter(torch_model(bundle), size)


def count_model(model: str, adapter: str = "none", *, img_size: int, checkpoint: str | Path | None = None,
                options: dict[str, Any] | None = None) -> CountedMacs:
    """The same counts as `count_bundle`, for a model not exported (e.g. at another input size than a bundle's).

    Builds the adapter's torch module exactly as `fsdeploy export` would (same builder, same weights), without
    writing ONNX graphs.
    """
    from fsdeploy.adapters import build_adapted
    from fsdeploy.backbones import BuildRequest

    counter = _counter(adapter)
    request = BuildRequest(model, Path(checkpoint) if checkpoint else None, img_size=img_size, options=dict(options or {}))
    with torch.no_grad():
        return counter(build_adapted(adapter, request).module.eval(), img_size)


@dataclass(frozen=True)
class CostTable:
    """Cost rows of one bundle and task shape, plus the methods left out and why."""

    rows: list[CostRow]
    skipped: dict[str, str]
    counts: CountedMacs


def bundle_costs(
    bundle: Bundle, task: TaskShape, methods: Sequence[Method] = DEFAULT_METHODS, *, counts: CountedMacs | None = None
) -> CostTable:
    """Adaptation cost of every method this bundle can be costed for, on task shape `task`.

    Args:
        counts: reuse counts from `count_bundle` (counting is the slow part; rows for several task shapes
            share it).
    """
    counts = counts or count_bundle(bundle)
    rows = adaptation_costs(counts, task, methods, transform_macs=transform_macs, transform_params=transform_params)
    raw = missing_counts(counts, methods, transform_macs=transform_macs)
    skipped = {}
    for key, why in raw.items():
        field = why.split()[0].removeprefix("CountedMacs.")
        skipped[key] = why_missing().get(field, why)
    return CostTable(rows, skipped, counts)


def task_shape(ways: int | None, shots: int | None, setting: str | None) -> TaskShape:
    """A task shape from `--ways/--shots` or a named preset (`5w1s`, `5w5s`, `md-max`).

    Raises:
        UnknownName: an unknown preset.
    """
    from fsdeploy.bench.costs import TASK_PRESETS

    if setting:
        if setting not in TASK_PRESETS:
            raise UnknownName(f"unknown setting {setting!r}; known: {', '.join(TASK_PRESETS)} (or pass --ways/--shots)")
        return TASK_PRESETS[setting]
    return TaskShape.from_shots(ways or 5, shots or 1)
