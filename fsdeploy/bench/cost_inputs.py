"""Count, on a bundle's own torch modules, every per-image number the adaptation-cost model combines.

`fsdeploy.bench.costs` turns per-image MACs into per-method costs (UpperCaSE, Patacchiola et al.,
NeurIPS 2022, Fig. 1). This module measures those MACs on the bundle's graphs rebuilt with the exported
weights, so `fsdeploy bench macs` prints counts, never constants:

- every bundle: the plain backbone's forward, and forward + backward of full, partial and BN-affine
  fine-tuning (`measure_backbone`);
- ResNet family: TSA's adapter network (Li et al., CVPR 2022; `fsdeploy.modules.adapters`) with its β
  alignment, α and β trained;
- `case` bundles: the query graph per image (the context pass does the same arithmetic per image), the CaSE
  MLPs once per task (the `case_gamma` graph) and the γ length;
- `toast` bundles: the tuned network's inference MACs (TOAST, Shi et al.; tuned per dataset, not per task).

Feature transforms (SimpleShot's CL2N) are costed by the transforms' own `macs` and `n_params`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    measure_backbone,
    measure_trained,
    missing_counts,
)
from fsdeploy.bench.macs import count_macs
from fsdeploy.errors import UnknownName
from fsdeploy.exporters.bundle import TORCH_WEIGHTS, Bundle

# What a method lacks, in words a user can act on (keys: the CountedMacs field it needs).
WHY_MISSING = {
    "case": "needs a CaSE bundle: fsdeploy export MODEL --adapter case",
    "tsa": "TSA residual adapters are defined for ResNet backbones only",
    "toast": "needs a TOAST bundle (ViT): fsdeploy export MODEL --adapter toast",
}


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
    from safetensors.torch import load_file

    from fsdeploy.exporters.graphs import BuildRequest, build_adapted

    m = bundle.manifest
    request = BuildRequest(m.model, img_size=m.preprocess.input_size[-1], options=dict(m.source.get("options") or {}))
    built = build_adapted(m.adapter, request)
    built.module.load_state_dict(load_file(str(bundle.file(TORCH_WEIGHTS))))
    return built.module.eval()


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


def measure_case(net: Any, image_size: int) -> CaseCounts:
    """CaSE counts of a CaseNet: query-graph MACs per image, MLP MACs per task, γ length."""
    x = torch.zeros(1, 3, image_size, image_size)
    g = int(net.gamma_size)
    forward = count_macs(net.query_module(), (x, torch.ones(g))).total
    mlp = count_macs(net.gamma_module(), torch.zeros(g)).total
    return CaseCounts(forward=forward, mlp=mlp, gamma=g)


def _plain(model: nn.Module, size: int) -> CountedMacs:
    return replace(measure_backbone(model, size), tsa=measure_tsa(model, size))


def _case(model: nn.Module, size: int) -> CountedMacs:
    return replace(_plain(model.backbone, size), case=measure_case(model, size))


def _toast(model: nn.Module, size: int) -> CountedMacs:
    x = torch.zeros(1, 3, size, size)
    return replace(_plain(model.backbone, size), toast=count_macs(model, x).total)


# adapter kind -> counter of its rebuilt torch module (STYLE P3: a table, not a branch per kind)
COUNTERS: dict[str, Callable[[nn.Module, int], CountedMacs]] = {"none": _plain, "case": _case, "toast": _toast}


def count_bundle(bundle: Bundle) -> CountedMacs:
    """Every per-image count of the bundle's adapter kind, on its rebuilt torch module.

    Raises:
        UnknownName: an adapter kind this module cannot count.
    """
    adapter = bundle.manifest.adapter
    if adapter not in COUNTERS:
        raise UnknownName(f"cannot count MACs of adapter {adapter!r}; known: {', '.join(sorted(COUNTERS))}")
    size = int(bundle.manifest.preprocess.input_size[-1])
    with torch.no_grad():
        return COUNTERS[adapter](torch_model(bundle), size)


def count_model(model: str, adapter: str = "none", *, img_size: int, checkpoint: str | Path | None = None,
                options: dict[str, Any] | None = None) -> CountedMacs:
    """The same counts as `count_bundle`, for a model not exported (e.g. at another input size than a bundle's).

    Builds the adapter's torch module exactly as `fsdeploy export` would (same builder, same weights), without
    writing ONNX graphs.
    """
    from fsdeploy.exporters.graphs import BuildRequest, build_adapted

    if adapter not in COUNTERS:
        raise UnknownName(f"cannot count MACs of adapter {adapter!r}; known: {', '.join(sorted(COUNTERS))}")
    request = BuildRequest(model, Path(checkpoint) if checkpoint else None, img_size=img_size, options=dict(options or {}))
    with torch.no_grad():
        return COUNTERS[adapter](build_adapted(adapter, request).module.eval(), img_size)


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
        skipped[key] = WHY_MISSING.get(field, why)
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
