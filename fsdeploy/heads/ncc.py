"""Nearest class centroid: score queries against class means of the support features.

Prototypical Networks (Snell et al., NeurIPS 2017) use softmax(-squared Euclidean distance) to the class
means; SimpleShot (Wang et al., arXiv:1911.04623, 2019) uses the same rule after centring and L2
normalisation (the `cl2n` transform). With `distance='cosine'` the logits are scale * cos(query, mean).
"""
from __future__ import annotations

import numpy as np

from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, I64, Head, check_fit_inputs, l2_normalise, prototypes, register_head, softmax
from fsdeploy.heads.common import StateMixin, check_choice, check_positive, check_query

DISTANCES = ("sqeuclidean", "cosine")


@register_head("ncc")
class NCCHead(StateMixin, Head):
    """Class means of the support features; no training, so the fit is one pass.

    Both rules are folded into a linear layer at fit time, logits = q @ weights_.T + offset_:
    squared distances expand as ||q||^2 - 2 q.p + ||p||^2, and ||q||^2 is the same for every class of
    a query, so it cancels in the softmax: weights_ = 2 p, offset_ = -||p||^2. For cosine,
    weights_ = scale * p / ||p||, offset_ = 0, and queries are L2-normalised first.

    Args:
        distance: 'sqeuclidean' (ProtoNet) or 'cosine'.
        scale: logit multiplier for cosine similarities (ignored for 'sqeuclidean').
        seed: unused (the fit is deterministic); kept so every head takes one.
    """

    _options = ("distance", "scale", "seed")
    _fitted = ("weights_", "offset_")

    def __init__(self, distance: str = "sqeuclidean", scale: float = 10.0, seed: int = 0):
        self.distance = check_choice("ncc distance", distance, DISTANCES)
        self.scale = float(check_positive("ncc scale", scale))
        self.seed = int(seed)
        self.weights_: F32 | None = None
        self.offset_: F32 | None = None

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> NCCHead:
        feats, labels, k = check_fit_inputs(feats, labels)
        protos = prototypes(feats, labels, k)
        dtype = np.result_type(feats.dtype, np.float32)  # float64 for features beyond LARGE: ||p||^2 stays finite
        if self.distance == "cosine":
            self.weights_ = (self.scale * l2_normalise(protos)).astype(np.float32)
            self.offset_ = np.zeros(k, dtype=np.float32)
        else:
            self.weights_ = (2.0 * protos).astype(dtype)
            self.offset_ = (-ops.rowdot(protos, protos)).astype(dtype)
        return self

    def predict_proba(self, feats: F32) -> F32:
        self._require_fitted()
        assert self.weights_ is not None and self.offset_ is not None
        feats = check_query(feats, self.weights_.shape[1], "ncc head")
        if self.distance == "cosine":
            feats = l2_normalise(feats)
        return softmax(ops.mm(feats, self.weights_.T) + self.offset_).astype(np.float32)

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        # class means as one-hot^T @ feats, then ||p||^2 (sqeuclidean) or ||p|| (cosine): one dot per class
        return ops.mm_macs(n_classes, n_support, dim) + ops.rowdot_macs(n_classes, dim)

    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        norms = ops.rowdot_macs(n_query, dim) if self.distance == "cosine" else 0
        return ops.mm_macs(n_query, dim, n_classes) + norms
