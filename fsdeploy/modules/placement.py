"""Where CaSE blocks go in each timm backbone family, stated once as data (STYLE P4).

UpperCaSE (Patacchiola et al., NeurIPS 2022, arXiv 2206.09843) places a CaSE block after selected
activations. A rule is a list of `Site`s; `case_sites` applies any rule to any model of its family, so
efficientnet_b1..b7 or resnet34/50 work without new code. The CaSE block scales the *output* of the
named module.

- efficientnet: after the stem's BatchNorm+activation (`bn1`); in every block after the norm+activation
  that follows the depthwise conv (`conv_dw` → next child), i.e. before the block's own SE, which stays
  (EdgeResidual blocks of EfficientNetV2 use the child after their fused `conv_exp`); after the head's
  norm+activation (`bn2`); after global pooling on the pooled `(N, C)` feature. efficientnet_b0: 19 blocks.
- resnet: in every residual block after the first ReLU (`act1`, i.e. conv1 → bn → ReLU) and after the
  ReLU that follows the residual add (the block's last `act*`); after global pooling. resnet18: 17 blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn

from fsdeploy.errors import InvalidInput, UnknownName


@dataclass(frozen=True)
class Site:
    """One kind of place: a child of every module whose name matches `parent`.

    Args:
        parent: dot-segment glob over `named_modules()` names ("blocks.*.*" matches "blocks.1.0" only;
            "" is the model itself).
        child: glob over that module's direct children names.
        pick: which matching child when several match: "first" or "last" (in registration order).
        offset: 0 takes the matching child; 1 the child registered right after it (e.g. the norm+act
            after `conv_dw`).
    """

    parent: str
    child: str
    pick: Literal["first", "last"] = "first"
    offset: int = 0


@dataclass(frozen=True)
class CasePlacement:
    """A family's CaSE rule: the sites, in no particular order (execution order is found by tracing)."""

    family: str
    sites: tuple[Site, ...]


EFFICIENTNET = CasePlacement(
    "efficientnet",
    (
        Site("", "bn1"),
        Site("blocks.*.*", "conv_dw", offset=1),
        Site("blocks.*.*", "conv_exp", offset=1),
        Site("", "bn2"),
        Site("", "global_pool"),
    ),
)
RESNET = CasePlacement(
    "resnet",
    (
        Site("layer*.*", "act1"),
        Site("layer*.*", "act*", pick="last"),
        Site("", "global_pool"),
    ),
)
CASE_PLACEMENT: dict[str, CasePlacement] = {r.family: r for r in (EFFICIENTNET, RESNET)}


def placement_for(family: str) -> CasePlacement:
    """The CaSE rule of a timm family.

    Raises:
        UnknownName: no rule for this family.
    """
    if family not in CASE_PLACEMENT:
        raise UnknownName(
            f"no CaSE placement rule for timm family {family!r}; supported families: {', '.join(sorted(CASE_PLACEMENT))} "
            "(e.g. efficientnet_b0, resnet18)"
        )
    return CASE_PLACEMENT[family]


def _glob_segments(name: str, pattern: str) -> bool:
    if pattern == "":
        return name == ""
    parts, globs = name.split("."), pattern.split(".")
    return len(parts) == len(globs) and all(fnmatchcase(n, g) for n, g in zip(parts, globs))


def _site_child(module: nn.Module, site: Site) -> str | None:
    names = [n for n, _ in module.named_children()]
    hits = [i for i, n in enumerate(names) if fnmatchcase(n, site.child)]
    if not hits:
        return None
    at = (hits[0] if site.pick == "first" else hits[-1]) + site.offset
    return names[at] if 0 <= at < len(names) else None


def case_sites(model: nn.Module, rule: CasePlacement) -> list[str]:
    """Names of the modules whose outputs get a CaSE block, in `named_modules()` order, without repeats.

    Raises:
        InvalidInput: the rule selects nothing in this model.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        for site in rule.sites:
            if not _glob_segments(name, site.parent):
                continue
            child = _site_child(module, site)
            if child is not None:
                found.append(f"{name}.{child}" if name else child)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    unique = sorted(set(found), key=order.__getitem__)
    if not unique:
        raise InvalidInput(
            f"the CaSE rule for family {rule.family!r} selects no module in this {type(model).__name__}; "
            "is it a timm model of that family?"
        )
    return unique
