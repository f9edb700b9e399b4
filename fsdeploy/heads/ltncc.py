"""Linear transform + NCC: a task-specific D x D map fitted on the support set, then cosine NCC.

Li, Liu and Bilen, "Universal Representation Learning from Multiple Domains for Few-shot Classification"
(ICCV 2021), pre-classifier alignment (the `pa` step of URL, and TSA's beta, Li et al. CVPR 2022): support
features are mapped by beta (identity at the start), prototypes are the class means of the mapped support
features, logits are 10 * cosine(mapped feature, prototype), and beta minimises the cross-entropy of the
support set classified against its own prototypes. Adadelta (rho 0.9, eps 1e-6), 40 full-batch steps,
learning rate 1.0 for domains unseen in training and 0.1 for seen ones (URL's settings).

With `steps=0` the head is a fixed-beta NCC: TSA learns beta jointly with its adapters and passes it as
`init`, and this head only builds the prototypes.
"""
from __future__ import annotations

import numpy as np

from fsdeploy.errors import InvalidInput
from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, I64, Head, check_fit_inputs, l2_normalise, one_hot, register_head, softmax
from fsdeploy.heads.common import StateMixin, check_optimizer, check_positive, check_query
from fsdeploy.heads.losses import ce_grad_, ce_loss
from fsdeploy.heads.optim import Adadelta, Optimiser, Rollback

OPTIMIZERS = ("adadelta", "rollback")


def _normalised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x / |x| row-wise, |x|); an all-zero row stays zero instead of becoming NaN."""
    norm = np.maximum(np.sqrt(ops.rowdot(x, x)), 1e-30)
    return x / norm[:, None], norm


def ltncc_loss_grad(
    beta: np.ndarray, feats: np.ndarray, labels: I64, n_classes: int, scale: float,
) -> tuple[float, np.ndarray]:
    """Support-set cross-entropy of the cosine NCC on mapped features z = feats @ beta.T, and d(loss)/d(beta).

    Prototypes are class means of z, so they depend on beta too; their gradient reaches each support row
    by a gather (p_k = mean of its rows) rather than a product.
    """
    n = feats.shape[0]
    counts = np.bincount(labels, minlength=n_classes).astype(feats.dtype)
    z = ops.mm(feats, beta.T)
    protos = ops.mm(one_hot(labels, n_classes).astype(feats.dtype).T, z) / counts[:, None]
    zn, z_norm = _normalised(z)
    pn, p_norm = _normalised(protos)
    logits = scale * ops.mm(zn, pn.T)
    loss = ce_loss(logits, labels)
    w = np.full((n, 1), 1.0 / n, dtype=feats.dtype)
    g = ce_grad_(logits, w, w * one_hot(labels, n_classes).astype(feats.dtype))
    d_zn = scale * ops.mm(g, pn)
    d_pn = scale * ops.mm(g.T, zn)
    d_z = (d_zn - ops.rowdot(d_zn, zn)[:, None] * zn) / z_norm[:, None]
    d_p = (d_pn - ops.rowdot(d_pn, pn)[:, None] * pn) / p_norm[:, None]
    d_z += (d_p / counts[:, None])[labels]
    return loss, ops.mm(d_z.T, feats)


@register_head("lt-ncc")
class LTNCCHead(StateMixin, Head):
    """URL pre-classifier alignment: learn beta (D x D) on the support set, classify by cosine NCC.

    Args:
        steps: Adadelta steps (40); 0 keeps beta fixed at `init`.
        lr: 1.0 for unseen domains (default), 0.1 for domains seen in training (URL).
        scale: cosine logit multiplier (10).
        rho, eps: Adadelta's constants (0.9, 1e-6, PyTorch's defaults).
        init: starting beta (D, D); None starts from the identity.
        optimizer: 'adadelta', or 'rollback' for Adadelta followed by a constant-ratio pull towards `init`
            (OLOR's rollback form with a fixed ratio; not OLOR as published).
        rollback: OLOR rollback ratio for beta.
        seed: unused (the fit is deterministic); kept so every head takes one.
    """

    _options = ("steps", "lr", "scale", "rho", "eps", "optimizer", "rollback", "seed")
    _fitted = ("beta_", "protos_")

    def __init__(
        self, steps: int = 40, lr: float = 1.0, scale: float = 10.0, rho: float = 0.9, eps: float = 1e-6,
        init: np.ndarray | None = None, optimizer: str = "adadelta", rollback: float = 0.01, seed: int = 0,
    ):
        if steps < 0:
            raise InvalidInput(f"lt-ncc steps must be >= 0; got {steps}")
        self.steps = int(steps)
        self.lr = float(lr)
        self.scale = float(check_positive("lt-ncc scale", scale))
        self.rho, self.eps = float(rho), float(eps)
        self.init = None if init is None else np.asarray(init, dtype=np.float32)
        self.optimizer = check_optimizer("lt-ncc optimizer", optimizer, OPTIMIZERS)
        self.rollback = float(rollback)
        self.seed = int(seed)
        self.beta_: F32 | None = None
        self.protos_: F32 | None = None  # unit-norm prototypes of the mapped support features

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> LTNCCHead:
        feats, labels, k = check_fit_inputs(feats, labels)
        d = feats.shape[1]
        if self.init is not None and self.init.shape != (d, d):
            raise InvalidInput(f"lt-ncc init must be ({d}, {d}) for features of size {d}; got {self.init.shape}")
        beta = np.eye(d, dtype=np.float32) if self.init is None else self.init.copy()
        params = {"beta": beta}
        opt: Optimiser = Adadelta(rho=self.rho, eps=self.eps)
        if self.optimizer == "rollback":
            opt = Rollback(opt, params, {"beta": self.rollback})
        for _ in range(self.steps):
            _, grad = ltncc_loss_grad(params["beta"], feats, labels, k, self.scale)
            opt.step(params, {"beta": grad}, self.lr)
        counts = np.bincount(labels, minlength=k).astype(np.float32)
        z = ops.mm(feats, params["beta"].T)
        protos = ops.mm(one_hot(labels, k).T, z) / counts[:, None]
        self.beta_ = params["beta"].astype(np.float32)
        self.protos_ = l2_normalise(protos).astype(np.float32)
        return self

    def predict_proba(self, feats: F32) -> F32:
        self._require_fitted()
        assert self.beta_ is not None and self.protos_ is not None
        feats = check_query(feats, self.beta_.shape[1], "lt-ncc head")
        z = l2_normalise(ops.mm(feats, self.beta_.T))
        return softmax(self.scale * ops.mm(z, self.protos_.T)).astype(np.float32)

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        n, d, k = n_support, dim, n_classes
        forward = ops.mm_macs(n, d, d) + ops.mm_macs(k, n, d)  # mapped features, prototypes
        per_step = (
            forward
            + ops.rowdot_macs(n + k, d)  # norms of mapped features and prototypes
            + 3 * ops.mm_macs(n, d, k)  # logits, d_zn, d_pn
            + ops.rowdot_macs(n + k, d)  # projections in the normalisation backward
            + ops.mm_macs(d, n, d)  # d_beta
        )
        return self.steps * per_step + forward + ops.rowdot_macs(k, d)

    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        return ops.mm_macs(n_query, dim, dim) + ops.rowdot_macs(n_query, dim) + ops.mm_macs(n_query, dim, n_classes)

    def n_params(self, dim: int, n_classes: int) -> int:
        return dim * dim
