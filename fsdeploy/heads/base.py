"""The per-task head interface, its registry, and maths shared by several heads.

Heads are small numpy estimators fitted on engine features of one task's support set.
Nothing under `fsdeploy.heads` imports torch; randomness comes only from a passed-in Generator.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
from numpy.typing import NDArray

from fsdeploy.errors import InvalidInput
from fsdeploy.heads import ops
from fsdeploy.registry import Registry

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]


class Head(ABC):
    """Fit on support features, score query features.

    Labels are class indices 0..K-1 (the task artefact keeps the class names).
    Fitted attributes end in `_`. `state()` returns plain arrays so a head round-trips through .npz.
    """

    name: ClassVar[str] = ""
    # True: predict_proba uses statistics of the query batch it is given (BD-CSPN), so a row's prediction
    # depends on the other rows; callers score a task's queries as one batch (runtime.predict_images does)
    transductive: ClassVar[bool] = False

    @abstractmethod
    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> Head:
        """Fit on support features `feats (N, D)` with labels `(N,)`; returns self."""

    @abstractmethod
    def predict_proba(self, feats: F32) -> F32:
        """Class probabilities `(M, K)` for query features `(M, D)`; rows sum to 1."""

    def predict(self, feats: F32) -> I64:
        """Most probable class index per query row."""
        return np.argmax(self.predict_proba(feats), axis=1).astype(np.int64)

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Hyper-parameters and fitted arrays, as numpy arrays (scalars as 0-d arrays)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Head:
        """Rebuild a fitted head from `state()`."""

    @abstractmethod
    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        """Exact multiply-accumulates to fit on `n_support` features of size `dim` with `n_classes`."""

    @abstractmethod
    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        """Exact multiply-accumulates to score `n_query` features."""

    def n_params(self, dim: int, n_classes: int) -> int:
        """Numbers fitted per task (for the adaptation-cost table)."""
        return n_classes * dim


H = TypeVar("H", bound=type[Head])


HEADS: Registry[type[Head]] = Registry("head", stamp="name")


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator adding a head to HEADS under `name`."""
    return HEADS.register(name)


def make_head(name: str, **opts: Any) -> Head:
    """Instantiate a registered head by name."""
    return HEADS.create(name, **opts)  # type: ignore[return-value]


def head_from_state(state: dict[str, np.ndarray]) -> Head:
    """Rebuild any registered head from a state dict that carries its name under 'head'."""
    return HEADS.from_state(state, "head")  # type: ignore[return-value]


LARGE = 1e15  # above this |x|, D * x^2 (squared norms, squared distances) can overflow float32 (3.4e38)


class NonFiniteFeatures(InvalidInput):
    """Features with NaN or inf; `rows` are the offending row indices (the caller maps them to image names)."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


def check_finite(feats: np.ndarray, what: str) -> None:
    """Raise NonFiniteFeatures naming the rows of `feats (N, D)` that hold NaN or inf."""
    finite = np.isfinite(feats)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.reshape(feats.shape[0], -1).all(axis=1)).tolist()
    shown = ", ".join(str(r) for r in rows[:8]) + (f" (+{len(rows) - 8} more)" if len(rows) > 8 else "")
    raise NonFiniteFeatures(
        f"{what} rows {shown} contain NaN or inf; check those images and the engine (try --precision fp32)", rows
    )


def working_precision(feats: np.ndarray) -> np.ndarray:
    """`feats` as they are, or as float64 when their magnitude could overflow float32 products (> LARGE)."""
    if feats.size and float(np.abs(feats).max()) > LARGE:
        return feats.astype(np.float64)
    return feats


def check_labels(labels: np.ndarray) -> I64:
    """Labels as int64; refuse non-integer values (0.7 is not silently truncated to 0) and bools."""
    raw = np.asarray(labels)
    if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise InvalidInput(f"labels must be integer class indices 0..K-1, got dtype {raw.dtype}")
    if np.issubdtype(raw.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw))) if raw.size else np.array([], dtype=np.int64)
        if bad.size:
            raise InvalidInput(
                f"labels must be integer class indices 0..K-1; rows {bad[:8].tolist()} hold {raw[bad[:3]].tolist()}"
            )
    return raw.astype(np.int64)


def check_fit_inputs(feats: np.ndarray, labels: np.ndarray) -> tuple[F32, I64, int]:
    """Validate support features/labels; returns float32 feats, int64 labels and the class count.

    Features larger than LARGE come back as float64, so heads compute with them without overflowing.

    Raises:
        InvalidInput: bad shapes, labels that are not integers covering 0..K-1 with K >= 2.
        NonFiniteFeatures: NaN or inf in the features (one line naming the rows).
    """
    feats = np.asarray(feats, dtype=np.float32)
    labels = check_labels(labels)
    if feats.ndim != 2 or labels.shape != (feats.shape[0],):
        raise InvalidInput(f"expected features (N, D) and labels (N,), got {feats.shape} and {labels.shape}")
    check_finite(feats, "support feature")
    k = int(labels.max()) + 1 if labels.size else 0
    if k < 2 or set(np.unique(labels).tolist()) != set(range(k)):
        raise InvalidInput(f"labels must cover 0..K-1 with K >= 2 classes, got {np.unique(labels).tolist()}")
    return working_precision(feats), labels, k


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def one_hot(labels: I64, k: int) -> F32:
    """(N, K) one-hot float32 matrix."""
    out = np.zeros((labels.shape[0], k), dtype=np.float32)
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


def prototypes(feats: F32, labels: I64, k: int) -> F32:
    """Class means (K, D) computed with one matrix product (K*N*D MACs, see `ops`)."""
    counts = np.bincount(labels, minlength=k).astype(feats.dtype)
    return ops.mm(one_hot(labels, k).astype(feats.dtype).T, feats) / counts[:, None]


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (N*D MACs for the squared norms, see `ops`).

    Each row is first divided by its largest |value| (free: elementwise), so the squared norm cannot
    overflow for any finite input; x / max(|x|, eps) is unchanged by that.
    """
    peak = np.max(np.abs(x), axis=1, keepdims=True) if x.size else np.ones((x.shape[0], 1), dtype=x.dtype)
    peak = np.where(peak > 0, peak, 1).astype(x.dtype)
    y = x / peak
    return y / np.maximum(np.sqrt(ops.rowdot(y, y))[:, None], eps / peak)
