"""Where adaptation blocks go in each timm backbone family, stated once as data (STYLE P4): one table keyed
by (method, family), one matcher.

A rule is a list of `Site`s; `find_sites` applies any rule to any model of its family, so efficientnet_b1..b7
or resnet34/50 work without new code.

CaSE (UpperCaSE, Patacchiola et al., NeurIPS 2022, arXiv 2206.09843) scales the *output* of each site:
- efficientnet: after the stem's BatchNorm+activation (`bn1`); in every block after the norm+activation
  that follows the depthwise conv (`conv_dw` → next child), i.e. before the block's own SE, which stays
  (EdgeResidual blocks of EfficientNetV2 use the child after their fused `conv_exp`); after the head's
  norm+activation (`bn2`); after global pooling on the pooled `(N, C)` feature. efficientnet_b0: 19 blocks.
- resnet: in every residual block after the first ReLU (`act1`, i.e. conv1 → bn → ReLU) and after the
  ReLU that follows the residual add (the block's last `act*`); after global pooling. resnet18: 17 blocks.

TSA (Li, Liu, Bilen, CVPR 2022) wraps each selected 3x3 conv with a parallel 1x1 adapter:
- resnet: timm names its residual-block convs layer{1..4}.{block}.conv{1,2[,3]}: BasicBlock has two 3x3
  convs, Bottleneck one (conv2); the stem ("conv1" or "conv1.N") and the 1x1 downsample never match.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn

from fsdeploy.errors import InvalidInput, RegistryError, UnknownName


@dataclass(frozen=True)
class Site:
    """One kind of place: a child of every module whose name matches `parent`.

    Args:
        parent: dot-segment glob over `named_modules()` names ("blocks.*.*" matches "blocks.1.0" only;
            "" is the model itself).
        child: glob over that module's direct children names.
        pick: which matching child: "first", "last" (in registration order) or "all".
        offset: 0 takes the matching child; 1 the child registered right after it (e.g. the norm+act
            after `conv_dw`).
        kernel: only Conv2d children with this kernel size (TSA's 3x3 convs); None: any module.
    """

    parent: str
    child: str
    pick: Literal["first", "last", "all"] = "first"
    offset: int = 0
    kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class Placement:
    """A (method, family) rule: the sites, in no particular order (execution order is found by tracing)."""

    method: str
    family: str
    sites: tuple[Site, ...]


PLACEMENTS: dict[tuple[str, str], Placement] = {
    (p.method, p.family): p
    for p in (
        Placement("case", "efficientnet", (
            Site("", "bn1"),
            Site("blocks.*.*", "conv_dw", offset=1),
            Site("blocks.*.*", "conv_exp", offset=1),
            Site("", "bn2"),
            Site("", "global_pool"),
        )),
        Placement("case", "resnet", (
            Site("layer*.*", "act1"),
            Site("layer*.*", "act*", pick="last"),
            Site("", "global_pool"),
        )),
        Placement("tsa", "resnet", (Site("layer*.*", "conv*", pick="all", kernel=(3, 3)),)),
    )
}
WHAT = {"case": "CaSE placement rule", "tsa": "TSA adapter placement"}


def register_placement(rule: Placement, what: str = "") -> Placement:
    """Add a (method, family) rule (a new adapter kind's file adds its own).

    Raises:
        RegistryError: the (method, family) pair has a rule already.
    """
    key = (rule.method, rule.family)
    if key in PLACEMENTS:
        raise RegistryError(f"placement rule {key} registered twice")
    PLACEMENTS[key] = rule
    if what:
        WHAT.setdefault(rule.method, what)
    return rule


def families(method: str) -> list[str]:
    """The timm families `method` has a placement rule for."""
    return sorted(f for m, f in PLACEMENTS if m == method)


def placement_for(method: str, family: str) -> Placement:
    """The rule of `method` ("case", "tsa") for a timm family.

    Raises:
        UnknownName: no rule for this (method, family).
    """
    if (method, family) not in PLACEMENTS:
        raise UnknownName(
            f"no {WHAT.get(method, method + ' placement rule')} for timm family {family!r}; supported families: "
            f"{', '.join(families(method))} (e.g. efficientnet_b0, resnet18)"
        )
    return PLACEMENTS[(method, family)]


def _glob_segments(name: str, pattern: str) -> bool:
    if pattern == "":
        return name == ""
    parts, globs = name.split("."), pattern.split(".")
    return len(parts) == len(globs) and all(fnmatchcase(n, g) for n, g in zip(parts, globs))


def _site_children(module: nn.Module, site: Site) -> list[str]:
    children = list(module.named_children())
    hits = [i for i, (n, m) in enumerate(children) if fnmatchcase(n, site.child)
            and (site.kernel is None or isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == site.kernel)]
    if not hits:
        return []
    chosen = hits if site.pick == "all" else [hits[0] if site.pick == "first" else hits[-1]]
    return [children[i + site.offset][0] for i in chosen if 0 <= i + site.offset < len(children)]


def find_sites(model: nn.Module, rule: Placement) -> list[str]:
    """Names of the modules the rule selects, in `named_modules()` order, without repeats.

    Raises:
        InvalidInput: the rule selects nothing in this model.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        for site in rule.sites:
            if _glob_segments(name, site.parent):
                found += [f"{name}.{child}" if name else child for child in _site_children(module, site)]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    unique = sorted(set(found), key=order.__getitem__)
    if not unique:
        raise InvalidInput(
            f"the {rule.method} rule for family {rule.family!r} selects no module in this {type(model).__name__}; "
            "is it a timm model of that family?"
        )
    return unique
