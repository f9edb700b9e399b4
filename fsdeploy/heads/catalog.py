"""What each registered head and transform is and costs, for listings (`fsdeploy heads`) and reports."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsdeploy.heads.base import HEADS
from fsdeploy.heads.transforms import TRANSFORMS


@dataclass(frozen=True)
class HeadCost:
    """One head's cost on one task shape, from its exact closed-form counts."""

    name: str
    summary: str  # first line of the class docstring
    fit_macs: int
    predict_macs: int  # per query image
    params: int  # numbers fitted per task


@dataclass(frozen=True)
class TransformInfo:
    name: str
    summary: str
    macs_per_row: int


def _summary(obj: object) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def head_costs(
    n_support: int, dim: int, n_classes: int, opts: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[HeadCost]:
    """Every registered head with default options (or `opts[name]`), costed on one task shape."""
    rows = []
    for name in sorted(HEADS):
        head = HEADS[name](**dict((opts or {}).get(name, {})))
        rows.append(HeadCost(
            name, _summary(HEADS[name]), head.fit_macs(n_support, dim, n_classes),
            head.predict_macs(1, dim, n_classes), head.n_params(dim, n_classes),
        ))
    return rows


def transform_infos(dim: int) -> list[TransformInfo]:
    """Every registered transform with its MACs per feature row of size `dim`."""
    return [TransformInfo(n, _summary(TRANSFORMS[n]), TRANSFORMS[n]().macs(1, dim)) for n in sorted(TRANSFORMS)]
