"""Feature transforms applied before a head, with their own registry.

- `none`: features as they are.
- `l2`: rows scaled to unit L2 norm.
- `cl2n`: centre, then L2-normalise (SimpleShot, Wang et al., arXiv:1911.04623, 2019). The centre is a mean
  feature given at construction (SimpleShot uses the mean of the base-class training features) or, when
  none is given, the mean of the support features.
- `ci`: channel importance, phi_k(x) = 1 / ln(1 / (x + 1e-5) + 1)^k with k = 1.3 (Luo et al., "Channel
  Importance Matters in Few-Shot Image Classification", ICML 2022): a fixed monotone map that evens out
  the channels of non-negative (post-ReLU) features.

A transform maps (N, D) to (N, D); `fit` sees the support features once, `apply` runs on support and
query features. `macs(n, dim)` counts `apply` under the convention in `fsdeploy.heads.ops`; fitting costs
no MACs (the only fitted quantity, a mean, is a sum).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from fsdeploy.errors import InvalidInput, RegistryError, UnknownName
from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, check_finite, l2_normalise
from fsdeploy.heads.common import StateMixin, check_positive


class Transform(StateMixin, ABC):
    """Fit on support features (may store state), then map any features of the same size."""

    _kind = "transform"

    def fit(self, feats: F32) -> Transform:
        """Store what `apply` needs from the support features `(N, D)`; returns self."""
        return self

    @abstractmethod
    def apply(self, feats: F32) -> F32:
        """Transformed features, same shape, float32."""

    @abstractmethod
    def macs(self, n: int, dim: int) -> int:
        """MACs of `apply` on n rows of size dim."""

    def fit_macs(self, n: int, dim: int) -> int:
        """MACs of `fit` on n support rows (0: transforms fit sums at most)."""
        return 0

    def n_params(self, dim: int) -> int:
        """Numbers fitted per task (0 unless the transform learns from the support set)."""
        return 0


X = TypeVar("X", bound=type[Transform])
TRANSFORMS: dict[str, type[Transform]] = {}


def register_transform(name: str) -> Callable[[X], X]:
    """Class decorator adding a transform to TRANSFORMS under `name`."""

    def add(cls: X) -> X:
        if name in TRANSFORMS:
            raise RegistryError(f"transform {name!r} registered twice")
        cls.name = name
        TRANSFORMS[name] = cls
        return cls

    return add


def make_transform(name: str, **opts: Any) -> Transform:
    """Instantiate a registered transform by name."""
    if name not in TRANSFORMS:
        raise UnknownName(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name](**opts)


def transform_from_state(state: Mapping[str, np.ndarray]) -> Transform:
    """Rebuild any registered transform from a state dict that carries its name under 'transform'."""
    name = str(state["transform"])
    if name not in TRANSFORMS:
        raise UnknownName(f"task artefact holds unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name].from_state(state)


def _as_features(feats: np.ndarray) -> F32:
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2:
        raise InvalidInput(f"expected features (N, D), got shape {feats.shape}")
    check_finite(feats, "feature")  # before any map that could turn inf into a finite number
    return feats


@register_transform("none")
class Identity(Transform):
    """Features unchanged."""

    def apply(self, feats: F32) -> F32:
        return _as_features(feats)

    def macs(self, n: int, dim: int) -> int:
        return 0


@register_transform("l2")
class L2Normalise(Transform):
    """Rows scaled to unit L2 norm."""

    def apply(self, feats: F32) -> F32:
        return l2_normalise(_as_features(feats)).astype(np.float32)

    def macs(self, n: int, dim: int) -> int:
        return ops.rowdot_macs(n, dim)


@register_transform("cl2n")
class CentredL2Normalise(Transform):
    """SimpleShot's CL2N: subtract a mean feature, then L2-normalise.

    Args:
        mean: (D,) centre, e.g. the mean feature of the base-class training data. None: the support mean.
    """

    _fitted = ("mean_", "fixed_")

    def __init__(self, mean: np.ndarray | None = None):
        self.fixed_ = np.asarray(mean is not None)
        self.mean_: F32 | None = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1)

    def fit(self, feats: F32) -> CentredL2Normalise:
        feats = _as_features(feats)
        if not bool(self.fixed_):
            self.mean_ = feats.mean(axis=0)
        return self

    def apply(self, feats: F32) -> F32:
        self._require_fitted()
        assert self.mean_ is not None
        feats = _as_features(feats)
        if feats.shape[1] != self.mean_.shape[0]:
            raise InvalidInput(f"cl2n mean has size {self.mean_.shape[0]}; got features of shape {feats.shape}")
        return l2_normalise(feats - self.mean_).astype(np.float32)

    def macs(self, n: int, dim: int) -> int:
        return ops.rowdot_macs(n, dim)

    def n_params(self, dim: int) -> int:
        return 0 if bool(self.fixed_) else dim  # the support mean is per task

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> CentredL2Normalise:
        obj = super().from_state(state)
        obj.mean_ = np.asarray(obj.mean_, dtype=np.float32)
        return obj


@register_transform("ci")
class ChannelImportance(Transform):
    """Luo et al.'s channel-importance map phi_k(x) = ln(1/(x + eps) + 1)^-k for non-negative features.

    Args:
        k: exponent (1.3 in the paper).
        eps: keeps 1/x finite at zero (1e-5).
        tolerance: negative values down to -tolerance are treated as 0 (rounding in fp16 engines);
            anything below raises InvalidInput, because the map is only defined for x >= 0.
    """

    _options = ("k", "eps", "tolerance")

    def __init__(self, k: float = 1.3, eps: float = 1e-5, tolerance: float = 1e-5):
        self.k = float(check_positive("ci k", k))
        self.eps = float(check_positive("ci eps", eps))
        self.tolerance = float(tolerance)

    def apply(self, feats: F32) -> F32:
        feats = _as_features(feats)
        lowest = float(feats.min()) if feats.size else 0.0
        if lowest < -self.tolerance:
            raise InvalidInput(
                f"channel importance needs non-negative features (post-ReLU); got a minimum of {lowest:.3g}; "
                "use another transform (l2, cl2n) for features with negative values"
            )
        x = np.maximum(feats, 0.0)
        return np.power(np.log1p(1.0 / (x + self.eps)), -self.k).astype(np.float32)

    def macs(self, n: int, dim: int) -> int:
        return 0
