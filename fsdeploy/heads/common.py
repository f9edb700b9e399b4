"""Plumbing shared by the heads: option checks, query checks and the state() / from_state() round trip."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from fsdeploy.errors import InvalidInput

T = TypeVar("T", bound="StateMixin")


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """Return `value` if it is one of `choices`, else raise InvalidInput listing them."""
    allowed = tuple(choices)
    if value not in allowed:
        raise InvalidInput(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_optimizer(what: str, value: str, choices: Iterable[str]) -> str:
    """`check_choice` for a head's optimizer, with a pointer for the old name 'olor'.

    The heads' constant-ratio pull towards their own init was called 'olor'; OLOR as published (Lu et al.,
    AAAI 2024) decays the ratio with the learning rate and by layer and anchors the *pretrained backbone*,
    so that name now belongs to the backbone fine-tuning path.
    """
    if value == "olor":
        raise InvalidInput(
            f"{what} 'olor' is now called 'rollback' (a constant-ratio pull towards the head's init); OLOR as "
            "published fine-tunes the backbone: `fsdeploy adapt --adapter bn-affine --optimizer olor`"
        )
    return check_choice(what, value, choices)


def check_positive(what: str, value: float) -> float:
    """Return `value` if it is > 0, else raise InvalidInput."""
    if not value > 0:
        raise InvalidInput(f"{what} must be > 0; got {value!r}")
    return value


def check_query(feats: np.ndarray, dim: int, who: str) -> np.ndarray:
    """Query features as float32 (M, dim), or float64 beyond `LARGE` (no overflow in the head's products).

    Raises:
        InvalidInput: another shape.
        NonFiniteFeatures: NaN or inf in some rows (the message names them).
    """
    from fsdeploy.heads.base import check_finite, working_precision

    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise InvalidInput(f"{who} was fitted on features of size {dim}; got query features of shape {feats.shape}")
    check_finite(feats, "query feature")
    return working_precision(feats)


class StateMixin:
    """state() / from_state() from two lists: constructor options (`_options`) and fitted arrays (`_fitted`).

    Options are stored as 0-d arrays (str, int, float, bool) and fitted arrays as they are, next to
    'head' (or 'transform') = the registered name, so the dict survives np.savez / np.load.
    """

    name: ClassVar[str] = ""
    _kind: ClassVar[str] = "head"
    _options: ClassVar[tuple[str, ...]] = ()
    _fitted: ClassVar[tuple[str, ...]] = ()

    def state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        out = {self._kind: np.asarray(self.name)}
        out.update({k: np.asarray(getattr(self, k)) for k in self._options})
        out.update({k: np.asarray(getattr(self, k)) for k in self._fitted})
        return out

    @classmethod
    def from_state(cls: type[T], state: Mapping[str, np.ndarray]) -> T:
        missing = [k for k in (*cls._options, *cls._fitted) if k not in state]
        if missing:
            raise InvalidInput(f"{cls._kind} state for {cls.name!r} lacks {', '.join(missing)}; re-fit and save again")
        obj = cls(**{k: _scalar(state[k]) for k in cls._options})
        for k in cls._fitted:
            setattr(obj, k, np.array(state[k]))
        return obj

    def _require_fitted(self) -> None:
        if any(getattr(self, k, None) is None for k in self._fitted):
            raise InvalidInput(f"{self._kind} {self.name!r} is not fitted; call fit(...) first")


def _scalar(a: np.ndarray) -> Any:
    """0-d array -> Python scalar (str, int, float or bool)."""
    v = np.asarray(a).item()
    return str(v) if isinstance(v, bytes) else v
