"""TaskModel: a feature transform followed by a head, used as one estimator.

Callers (task artefacts, accuracy benchmarks) fit, predict, save and cost a task's classifier through
this one object. Its state is the transform's and the head's, under the prefixes 'transform.' and 'head.'.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fsdeploy.errors import InvalidInput
from fsdeploy.heads.base import F32, I64, Head, check_finite, check_labels, head_from_state, make_head
from fsdeploy.heads.transforms import Transform, make_transform, transform_from_state


class TaskModel:
    """transform -> head.

    Args:
        transform: fitted on the support features, then applied to support and query features.
        head: fitted on the transformed support features.
    """

    def __init__(self, transform: Transform, head: Head):
        self.transform = transform
        self.head = head

    @classmethod
    def create(cls, head: str, transform: str = "none", *, transform_opts: Mapping[str, Any] | None = None,
               **head_opts: Any) -> TaskModel:
        """Build from registered names: `TaskModel.create('ncc', 'cl2n', distance='cosine')`."""
        return cls(make_transform(transform, **dict(transform_opts or {})), make_head(head, **head_opts))

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> TaskModel:
        """Fit the transform, then the head on the transformed support features; returns self.

        Raises:
            NonFiniteFeatures: NaN or inf in the support features (rows named).
            InvalidInput: labels that are not integer class indices.
        """
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim == 2:
            check_finite(feats, "support feature")
        check_labels(labels)
        self.transform.fit(feats)
        self.head.fit(self.transform.apply(feats), labels, rng=rng)
        return self

    def predict_proba(self, feats: F32) -> F32:
        """Class probabilities (M, K) for query features (M, D); NaN or inf rows raise NonFiniteFeatures."""
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim == 2:
            check_finite(feats, "query feature")
        return self.head.predict_proba(self.transform.apply(feats))

    def predict(self, feats: F32) -> I64:
        """Most probable class index per query row."""
        return np.argmax(self.predict_proba(feats), axis=1).astype(np.int64)

    def state(self) -> dict[str, np.ndarray]:
        """Transform and head state, prefixed, ready for np.savez."""
        out = {f"transform.{k}": v for k, v in self.transform.state().items()}
        out.update({f"head.{k}": v for k, v in self.head.state().items()})
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> TaskModel:
        """Rebuild a fitted TaskModel from `state()`."""
        parts: dict[str, dict[str, np.ndarray]] = {"transform": {}, "head": {}}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix in parts and rest:
                parts[prefix][rest] = value
        if "transform" not in parts["transform"] or "head" not in parts["head"]:
            raise InvalidInput(
                "task model state lacks 'transform.transform' or 'head.head'; re-run adapt to rebuild it"
            )
        return cls(transform_from_state(parts["transform"]), head_from_state(parts["head"]))

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        """Transform fit and apply on the support set, then the head fit."""
        return (self.transform.fit_macs(n_support, dim) + self.transform.macs(n_support, dim)
                + self.head.fit_macs(n_support, dim, n_classes))

    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        """Transform and head on n_query rows."""
        return self.transform.macs(n_query, dim) + self.head.predict_macs(n_query, dim, n_classes)

    def n_params(self, dim: int, n_classes: int) -> int:
        """Numbers fitted per task: the head's, plus a transform's support statistics (cl2n's mean)."""
        return self.transform.n_params(dim) + self.head.n_params(dim, n_classes)
