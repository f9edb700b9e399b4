"""Linear head trained with Adam on the support features: the UpperCaSE recipe.

Patacchiola et al., "Contextual Squeeze-and-Excitation for Efficient Few-Shot Image Classification"
(NeurIPS 2022): after the CaSE context pass, UpperCaSE fits a linear layer from zero for 500 Adam steps
(weight decay 1e-5, learning rate falling linearly from 1e-3 to 1e-5) on batches of 128 support rows
drawn with replacement, minimising the mean cross-entropy.

Each batch draws from only N cached rows, so a step here works on the distinct rows, each weighted by
how often the batch drew it (count / 128): the same loss and gradient as the batch with repeats, in
min(N, 128) rows instead of 128. The counts for all 500 steps are made up front with one bincount.
When N > 128 the drawn rows themselves are used. Weights and bias live in one (K, D+1) array against
features with a constant 1 appended, so Adam makes one pass per step over one array.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, I64, Head, check_fit_inputs, one_hot, register_head, softmax
from fsdeploy.heads.common import StateMixin, check_optimizer, check_positive, check_query
from fsdeploy.heads.losses import ce_grad_, ce_loss
from fsdeploy.heads.optim import Adam, Optimiser, Rollback


class AffineHead(StateMixin, Head):
    """Shared tail of the heads that end as logits = feats @ weight_.T + bias_."""

    _fitted: ClassVar[tuple[str, ...]] = ("weight_", "bias_")

    weight_: F32 | None = None
    bias_: F32 | None = None

    def predict_proba(self, feats: F32) -> F32:
        self._require_fitted()
        assert self.weight_ is not None and self.bias_ is not None
        feats = check_query(feats, self.weight_.shape[1], f"{self.name} head")
        return softmax(ops.mm(feats, self.weight_.T) + self.bias_).astype(np.float32)

    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        return ops.mm_macs(n_query, dim, n_classes)

    def n_params(self, dim: int, n_classes: int) -> int:
        return n_classes * (dim + 1)

    def _set_theta(self, theta: np.ndarray) -> None:
        """Split a (K, D+1) [weights | bias] array into weight_ and bias_ (float32)."""
        self.weight_ = np.ascontiguousarray(theta[:, :-1], dtype=np.float32)
        self.bias_ = np.ascontiguousarray(theta[:, -1], dtype=np.float32)


def augment(feats: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D+1) with a constant 1 appended to each row (the bias input), same dtype."""
    out = np.empty((feats.shape[0], feats.shape[1] + 1), dtype=feats.dtype)
    out[:, :-1] = feats
    out[:, -1] = 1
    return out


def draw_batches(rng: np.random.Generator, n_support: int, iters: int = 500, batch: int = 128) -> I64:
    """Row indices of every batch, (iters, batch), drawn with replacement in one call.

    Exposed so a reference implementation can replay exactly the batches a head trained on.
    """
    return rng.integers(0, n_support, size=(iters, batch)).astype(np.int64)


def linear_ce_grad_into(
    theta: np.ndarray, x: np.ndarray, weights: np.ndarray, weighted_targets: np.ndarray,
    logits: np.ndarray, grad: np.ndarray,
) -> None:
    """Gradient of the weighted cross-entropy of logits = x @ theta.T, written into `grad` (K, D+1).

    `logits` (n, K) is scratch space; `weights` (n, 1) and `weighted_targets` (n, K) as in `ce_grad_`.
    """
    ops.mm(x, theta.T, out=logits)
    ce_grad_(logits, weights, weighted_targets)
    ops.mm(logits.T, x, out=grad)


def linear_loss_grad(theta: np.ndarray, x: np.ndarray, labels: I64, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted cross-entropy of x @ theta.T and its gradient; the pieces the training loop uses."""
    k = theta.shape[0]
    w = np.asarray(weights, dtype=x.dtype).reshape(-1, 1)
    loss = ce_loss(ops.mm(x, theta.T), labels, w)
    logits = np.empty((x.shape[0], k), dtype=x.dtype)
    grad = np.empty_like(theta)
    linear_ce_grad_into(theta, x, w, w * one_hot(labels, k).astype(x.dtype), logits, grad)
    return loss, grad


def train_linear(
    xa: np.ndarray, y1h: np.ndarray, batches: I64, lrs: np.ndarray, opt: Optimiser, theta: np.ndarray,
) -> np.ndarray:
    """Run one optimiser step per row of `batches` on the mean cross-entropy of each batch.

    Args:
        xa: (N, D+1) bias-augmented support features.
        y1h: (N, K) one-hot labels, same dtype.
        batches: (T, B) row indices per step.
        lrs: (T,) learning rate per step.
        opt: optimiser stepping {'theta': theta}.
        theta: (K, D+1) initial parameters, updated in place and returned.
    """
    n, k = y1h.shape
    t_steps, b = batches.shape
    if n <= b:  # distinct rows weighted by their draw counts
        offsets = n * np.arange(t_steps)[:, None]
        counts = np.bincount((batches + offsets).ravel(), minlength=t_steps * n).reshape(t_steps, n)
        weights = (counts / b).astype(xa.dtype)[:, :, None]
        wtargets = weights * y1h
        rows = None
    else:  # more support rows than a batch: use the drawn rows
        weights = np.full((1, b, 1), 1.0 / b, dtype=xa.dtype)
        wtargets = y1h[batches] / np.asarray(b, dtype=xa.dtype)
        rows = np.empty((b, xa.shape[1]), dtype=xa.dtype)
    r = min(n, b)
    logits = np.empty((r, k), dtype=xa.dtype)
    grad = np.empty_like(theta)
    params, grads = {"theta": theta}, {"theta": grad}
    for t in range(t_steps):
        if rows is None:
            x, w = xa, weights[t]
        else:
            x, w = np.take(xa, batches[t], axis=0, out=rows), weights[0]
        linear_ce_grad_into(theta, x, w, wtargets[t], logits, grad)
        opt.step(params, grads, float(lrs[t]))
    return theta


OPTIMIZERS = ("adam", "rollback")


@register_head("linear")
class LinearHead(AffineHead):
    """UpperCaSE linear head: zero init, Adam, 500 steps of 128 rows drawn with replacement.

    Args:
        iters: optimiser steps (500 in UpperCaSE).
        batch: rows per step, drawn with replacement (128).
        lr_start, lr_end: learning rate of the first and last step, linear in between (1e-3, 1e-5).
        weight_decay: added to the gradient of weights and bias, as torch.optim.Adam does (1e-5).
        optimizer: 'adam', or 'rollback': Adam, then a constant-ratio pull of the weights back towards the
            zero init after every step (OLOR's rollback form with a fixed ratio on a new head; not OLOR as
            published, which is `adapt --adapter bn-affine --optimizer olor`).
        rollback: rollback ratio for the weights (per step).
        rollback_bias: rollback ratio for the bias (0: biases are not pulled back).
        seed: seeds the batch draw when fit() gets no generator.
    """

    _options = ("iters", "batch", "lr_start", "lr_end", "weight_decay", "optimizer", "rollback", "rollback_bias",
                "seed")

    def __init__(
        self, iters: int = 500, batch: int = 128, lr_start: float = 1e-3, lr_end: float = 1e-5,
        weight_decay: float = 1e-5, optimizer: str = "adam", rollback: float = 0.01, rollback_bias: float = 0.0,
        seed: int = 0,
    ):
        self.iters = int(check_positive("linear iters", iters))
        self.batch = int(check_positive("linear batch", batch))
        self.lr_start, self.lr_end = float(lr_start), float(lr_end)
        self.weight_decay = float(weight_decay)
        self.optimizer = check_optimizer("linear optimizer", optimizer, OPTIMIZERS)
        self.rollback, self.rollback_bias = float(rollback), float(rollback_bias)
        self.seed = int(seed)

    def learning_rates(self) -> np.ndarray:
        """(iters,) learning rate of each step."""
        return np.linspace(self.lr_start, self.lr_end, self.iters)

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> LinearHead:
        feats, labels, k = check_fit_inputs(feats, labels)
        rng = rng if rng is not None else np.random.default_rng(self.seed)
        batches = draw_batches(rng, feats.shape[0], self.iters, self.batch)
        xa = augment(feats)
        theta = np.zeros((k, xa.shape[1]), dtype=xa.dtype)  # float64 only for features beyond LARGE
        opt: Optimiser = Adam(weight_decay=self.weight_decay)
        if self.optimizer == "rollback":
            lam = np.full(xa.shape[1], self.rollback, dtype=np.float32)
            lam[-1] = self.rollback_bias
            opt = Rollback(opt, {"theta": theta}, {"theta": lam})
        self._set_theta(train_linear(xa, one_hot(labels, k), batches, self.learning_rates(), opt, theta))
        return self

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        rows = min(n_support, self.batch)  # distinct rows (N <= batch) or the drawn rows
        return self.iters * 2 * ops.mm_macs(rows, dim + 1, n_classes)  # logits + weight gradient
