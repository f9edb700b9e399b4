"""Weighted softmax cross-entropy on logits: the loss every iterative head minimises.

A mean over a batch of b rows is the weighted form with every weight 1/b; the UpperCaSE head instead
weights the N distinct support rows by how often its batch drew them (count/b), which gives the same
loss and gradient as the batch with repeats. Nothing here performs a counted product (see `ops`).
"""
from __future__ import annotations

import numpy as np

from fsdeploy.heads.base import log_softmax


def ce_grad_(logits: np.ndarray, weights: np.ndarray, weighted_targets: np.ndarray) -> np.ndarray:
    """Overwrite `logits` (n, K) with d(loss)/d(logits) = weights * (softmax(logits) - targets).

    Args:
        logits: (n, K) array, overwritten (this runs once per optimiser step, so it allocates little).
        weights: (n, 1) per-row loss weights (1/b for a batch mean).
        weighted_targets: (n, K) one-hot targets already multiplied by `weights`.
    Returns:
        `logits`, now holding the gradient.
    """
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    scale = logits.sum(axis=1, keepdims=True)
    np.divide(weights, scale, out=scale)
    logits *= scale
    logits -= weighted_targets
    return logits


def ce_loss(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted cross-entropy sum_i w_i * -log softmax(logits_i)[y_i]; plain mean when `weights` is None."""
    nll = -log_softmax(logits)[np.arange(labels.shape[0]), labels]
    if weights is None:
        return float(nll.mean())
    return float(np.sum(np.reshape(weights, -1) * nll))
