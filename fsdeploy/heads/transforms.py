"""Feature transforms applied before a head, with their own registry.

- `none`: features as they are.
- `l2`: rows scaled to unit L2 norm.
- `cl2n`: centre on the base-class mean feature, then L2-normalise (SimpleShot, Wang et al., arXiv:1911.04623,
  2019); the mean is given at construction (bundles store it: `fsdeploy export --base-data DIR`).
- `cl2n-support`: the same centred on the support set's own mean (a per-task variant, not SimpleShot).
- `ci`: channel importance (Luo et al., "Channel Importance Matters in Few-Shot Image Classification",
  ICML 2022): the odd map f(x) = phi(x+) - phi(x-), phi(z) = 1 / ln(1 / (z + 1e-5) + 1)^k, k = 1.3, which
  evens out the channels, then L2 normalisation; pair it with the cosine NCC head, as the official code.

A transform maps (N, D) to (N, D); `fit` sees the support features once, `apply` runs on support and
query features. `macs(n, dim)` counts `apply` under the convention in `fsdeploy.heads.ops`; fitting costs
no MACs (the only fitted quantity, a mean, is a sum).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from fsdeploy.errors import InvalidInput
from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, check_finite, l2_normalise
from fsdeploy.heads.common import StateMixin, check_positive
from fsdeploy.registry import Registry


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


TRANSFORMS: Registry[type[Transform]] = Registry("transform", stamp="name")


def register_transform(name: str) -> Callable[[X], X]:
    """Class decorator adding a transform to TRANSFORMS under `name`."""
    return TRANSFORMS.register(name)


def make_transform(name: str, **opts: Any) -> Transform:
    """Instantiate a registered transform by name."""
    return TRANSFORMS.create(name, **opts)  # type: ignore[return-value]


def transform_from_state(state: Mapping[str, np.ndarray]) -> Transform:
    """Rebuild any registered transform from a state dict that carries its name under 'transform'."""
    return TRANSFORMS.from_state(state, "transform")  # type: ignore[return-value]


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
    """SimpleShot's CL2N: subtract the base-class mean feature, then L2-normalise.

    SimpleShot (mileyan/simple_shot `src/train.py`) centres on the mean feature of the base training
    classes, one fixed vector; `fsdeploy adapt --transform cl2n` passes the one the bundle stores (export
    with `--base-data DIR`). Fitting without a mean is refused: the support mean is another method
    (`cl2n-support`).

    Args:
        mean: (D,) the base-class mean feature.
    """

    _fitted = ("mean_",)

    def __init__(self, mean: np.ndarray | None = None):
        self.mean_: F32 | None = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1)

    def fit(self, feats: F32) -> CentredL2Normalise:
        _as_features(feats)
        if self.mean_ is None:
            raise InvalidInput(
                "cl2n (SimpleShot) centres on the base-class mean feature and none was given; export the bundle "
                "with --base-data DIR (images of the backbone's training classes), or use --transform cl2n-support"
            )
        return self

    def apply(self, feats: F32) -> F32:
        self._require_fitted()
        assert self.mean_ is not None
        feats = _as_features(feats)
        if feats.shape[1] != self.mean_.shape[0]:
            raise InvalidInput(f"{self.name} mean has size {self.mean_.shape[0]}; got features of shape {feats.shape}")
        return l2_normalise(feats - self.mean_).astype(np.float32)

    def macs(self, n: int, dim: int) -> int:
        return ops.rowdot_macs(n, dim)

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> CentredL2Normalise:
        obj = super().from_state(state)
        obj.mean_ = np.asarray(obj.mean_, dtype=np.float32)
        return obj


@register_transform("cl2n-support")
class SupportCentredL2Normalise(CentredL2Normalise):
    """CL2N centred on the task's own support mean (not SimpleShot: that centres on the base-class mean)."""

    def __init__(self) -> None:
        super().__init__(None)

    def fit(self, feats: F32) -> SupportCentredL2Normalise:
        self.mean_ = _as_features(feats).astype(np.float64).mean(axis=0).astype(np.float32)
        return self

    def n_params(self, dim: int) -> int:
        return dim  # the support mean is per task


@register_transform("ci")
class ChannelImportance(Transform):
    """Luo et al.'s channel-importance map, odd: f(x) = phi(x+) - phi(x-), phi(z) = ln(1/(z + eps) + 1)^-k; then L2.

    As the official code (Frankluox/Channel_Importance_FSL, `simple_transform` and `PN_head`): the map is
    applied to the positive and the negative part separately, each with its own phi(0), so f(0) = 0,
    f(-x) = -f(x), and features of either sign (SiLU, GELU backbones) are fine. The official head then
    L2-normalises, averages into prototypes, L2-normalises those and scores by cosine: this transform
    does the first L2 step, and `--head ncc --head-opt distance=cosine` does the rest (the cost and
    accuracy tables' `ci` row is that pair).

    Args:
        k: exponent (beta = 1.3 in the paper and code).
        eps: keeps 1/z finite at zero (1e-5, as the code).
        normalise: L2-normalise after the map (True: the official placement).
    """

    _options = ("k", "eps", "normalise")

    def __init__(self, k: float = 1.3, eps: float = 1e-5, normalise: bool = True):
        self.k = float(check_positive("ci k", k))
        self.eps = float(check_positive("ci eps", eps))
        self.normalise = bool(normalise)

    def apply(self, feats: F32) -> F32:
        x = _as_features(feats).astype(np.float64)  # phi(0) is subtracted from phi(z): keep the digits
        phi = lambda z: np.power(np.log1p(1.0 / (z + self.eps)), -self.k)
        out = phi(np.maximum(x, 0.0)) - phi(np.maximum(-x, 0.0))
        return (l2_normalise(out) if self.normalise else out).astype(np.float32)

    def macs(self, n: int, dim: int) -> int:
        return ops.rowdot_macs(n, dim) if self.normalise else 0
