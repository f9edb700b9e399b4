"""Baseline and Baseline++ heads: a classifier trained on the support set with SGD.

Chen et al., "A Closer Look at Few-shot Classification" (ICLR 2019). At test time both methods train a new
classifier on frozen support features: 100 epochs over the shuffled support set in batches of 4, SGD with
learning rate 0.01, momentum 0.9, dampening 0.9 and weight decay 1e-3, cross-entropy. The dampening is in
the authors' code (CloserLookFewShot, `set_forward_adaptation`) though not in the paper; set it to 0 for
plain momentum. Baseline uses a linear layer; Baseline++ a cosine classifier, logits = scale * x/|x| . w_k,
with class weights w_k = g_k v_k / |v_k| (weight normalisation, g_k learned per class) and scale 2 for up to
200 classes, 10 above (CloserLookFewShot `backbone.py`, `distLinear`: "a larger scale factor is required to
handle >1000 output classes").

Initialisation follows torch.nn.Linear: weights (and Baseline's bias) uniform in +-1/sqrt(D), drawn
from the generator before the epoch permutations; Baseline++ starts with g_k = |v_k|, as weight_norm does.
"""
from __future__ import annotations

import numpy as np

from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, I64, Head, check_fit_inputs, one_hot, register_head, softmax
from fsdeploy.heads.common import StateMixin, check_optimizer, check_positive, check_query
from fsdeploy.heads.linear import AffineHead, augment, linear_ce_grad_into
from fsdeploy.heads.losses import ce_grad_, ce_loss
from fsdeploy.heads.optim import SGD, Optimiser, Rollback

OPTIMIZERS = ("sgd", "rollback")
SCALE_SWITCH = 200  # distLinear: scale 2 up to this many classes, 10 above


def cosine_scale(n_classes: int) -> float:
    """CloserLookFewShot's Baseline++ logit scale for `n_classes` outputs."""
    return 2.0 if n_classes <= SCALE_SWITCH else 10.0
FEATURE_EPS = 1e-5  # Baseline++ divides features by (|x| + 1e-5), as the reference code does


def uniform_init(rng: np.random.Generator, n_classes: int, dim: int, bias: bool = True) -> tuple[F32, F32 | None]:
    """torch.nn.Linear's default init in distribution: U(-1/sqrt(dim), 1/sqrt(dim)); weights, then bias."""
    bound = 1.0 / np.sqrt(dim)
    weight = rng.uniform(-bound, bound, size=(n_classes, dim)).astype(np.float32)
    b = rng.uniform(-bound, bound, size=n_classes).astype(np.float32) if bias else None
    return weight, b


def draw_epochs(rng: np.random.Generator, n_support: int, epochs: int) -> I64:
    """(epochs, N) visiting order: one permutation of the support rows per epoch."""
    return np.stack([rng.permutation(n_support) for _ in range(epochs)]).astype(np.int64)


def normalise_features(feats: np.ndarray) -> np.ndarray:
    """x / (|x| + 1e-5) row-wise (N*D MACs), computed as y / (|y| + 1e-5 / m) with y = x / m, m = max |x|,
    so the squared norm cannot overflow."""
    peak = np.max(np.abs(feats), axis=1) if feats.size else np.ones(feats.shape[0], dtype=feats.dtype)
    peak = np.where(peak > 0, peak, 1).astype(feats.dtype)
    y = feats / peak[:, None]
    return y / (np.sqrt(ops.rowdot(y, y)) + FEATURE_EPS / peak)[:, None]


def cosine_ce_grad(
    v: np.ndarray, g: np.ndarray, xn: np.ndarray, weights: np.ndarray, weighted_targets: np.ndarray, scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients (dv, dg) of the weighted cross-entropy of logits = scale * xn @ (g v / |v|).T.

    With w = g v/|v| and G = dL/dw: dL/dg = G . v/|v| and dL/dv = g/|v| (G - (G . v/|v|) v/|v|).
    """
    vnorm = np.sqrt(ops.rowdot(v, v))
    w = v * (g / vnorm)[:, None]
    logits = scale * ops.mm(xn, w.T)
    ce_grad_(logits, weights, weighted_targets)
    gw = scale * ops.mm(logits.T, xn)
    dg = ops.rowdot(gw, v) / vnorm
    dv = (g / vnorm)[:, None] * (gw - (dg / vnorm)[:, None] * v)
    return dv, dg


def cosine_loss_grad(
    v: np.ndarray, g: np.ndarray, xn: np.ndarray, labels: I64, scale: float,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of the cosine classifier and its gradients (for checks)."""
    n, k = xn.shape[0], v.shape[0]
    w = np.full((n, 1), 1.0 / n, dtype=xn.dtype)
    logits = scale * ops.mm(xn, (v * (g / np.sqrt(ops.rowdot(v, v)))[:, None]).T)
    dv, dg = cosine_ce_grad(v, g, xn, w, w * one_hot(labels, k).astype(xn.dtype), scale)
    return ce_loss(logits, labels), dv, dg


class _SGDRecipe(StateMixin, Head):
    """Options and batching shared by Baseline and Baseline++."""

    def _init_recipe(
        self, epochs: int, batch: int, lr: float, momentum: float, dampening: float, weight_decay: float,
        optimizer: str, rollback: float, seed: int,
    ) -> None:
        self.epochs = int(check_positive(f"{self.name} epochs", epochs))
        self.batch = int(check_positive(f"{self.name} batch", batch))
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.weight_decay = float(weight_decay)
        self.optimizer = check_optimizer(f"{self.name} optimizer", optimizer, OPTIMIZERS)
        self.rollback = float(rollback)
        self.seed = int(seed)

    def _optimiser(self, params: dict[str, np.ndarray], lam: dict[str, float | np.ndarray]) -> Optimiser:
        opt: Optimiser = SGD(momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay)
        return Rollback(opt, params, lam) if self.optimizer == "rollback" else opt

    def _batches(self, order: I64) -> list[I64]:
        """Row indices of every step: each epoch's permutation cut into batches (the last may be short)."""
        n = order.shape[1]
        return [perm[i : i + self.batch] for perm in order for i in range(0, n, self.batch)]


@register_head("baseline")
class BaselineHead(_SGDRecipe, AffineHead):
    """Baseline (Chen et al. 2019): linear layer, SGD, 100 epochs of batch 4 over the support set.

    Args:
        epochs, batch, lr, momentum, dampening, weight_decay: the SGD recipe (100, 4, 0.01, 0.9, 0.9, 1e-3).
        optimizer: 'sgd', or 'rollback': SGD, then a constant-ratio pull of the weights back towards their
            random init after every step (OLOR's rollback form with a fixed ratio on a new head; not OLOR as
            published, which is `adapt --adapter bn-affine --optimizer olor`).
        rollback, rollback_bias: rollback ratios of weights and bias.
        seed: seeds init and shuffling when fit() gets no generator.
    """

    _options = ("epochs", "batch", "lr", "momentum", "dampening", "weight_decay", "optimizer", "rollback",
                "rollback_bias", "seed")

    def __init__(
        self, epochs: int = 100, batch: int = 4, lr: float = 0.01, momentum: float = 0.9, dampening: float = 0.9,
        weight_decay: float = 1e-3, optimizer: str = "sgd", rollback: float = 0.01, rollback_bias: float = 0.0,
        seed: int = 0,
    ):
        self._init_recipe(epochs, batch, lr, momentum, dampening, weight_decay, optimizer, rollback, seed)
        self.rollback_bias = float(rollback_bias)

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> BaselineHead:
        feats, labels, k = check_fit_inputs(feats, labels)
        rng = rng if rng is not None else np.random.default_rng(self.seed)
        n, d = feats.shape
        weight, bias = uniform_init(rng, k, d)
        order = draw_epochs(rng, n, self.epochs)
        xa, y1h = augment(feats), one_hot(labels, k)
        theta = np.concatenate([weight, bias[:, None]], axis=1).astype(xa.dtype)  # float64 beyond LARGE
        lam = np.full(d + 1, self.rollback, dtype=np.float32)
        lam[-1] = self.rollback_bias
        params, grad = {"theta": theta}, np.empty_like(theta)
        opt = self._optimiser(params, {"theta": lam})
        for rows in self._batches(order):
            w = np.full((rows.shape[0], 1), 1.0 / rows.shape[0], dtype=xa.dtype)
            logits = np.empty((rows.shape[0], k), dtype=xa.dtype)
            linear_ce_grad_into(theta, xa[rows], w, w * y1h[rows], logits, grad)
            opt.step(params, {"theta": grad}, self.lr)
        self._set_theta(theta)
        return self

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        # every epoch sees each row once: logits + weight gradient on (D+1)-long augmented rows
        return self.epochs * 2 * ops.mm_macs(n_support, dim + 1, n_classes)


@register_head("baseline++")
class BaselinePlusPlusHead(_SGDRecipe):
    """Baseline++ (Chen et al. 2019): cosine classifier with learned per-class norms, same SGD recipe.

    Args:
        scale: logit multiplier, or 'auto' (default): 2 for up to 200 classes, 10 above, as the reference code.
        epochs, batch, lr, momentum, dampening, weight_decay: the SGD recipe, as for Baseline.
        optimizer: 'sgd' or 'rollback' (see BaselineHead).
        rollback, rollback_norm: rollback ratios of the directions v and of the norms g.
        seed: seeds init and shuffling when fit() gets no generator.
    """

    _options = ("scale", "epochs", "batch", "lr", "momentum", "dampening", "weight_decay", "optimizer", "rollback",
                "rollback_norm", "seed")
    _fitted = ("weight_", "scale_")

    def __init__(
        self, scale: float | str = "auto", epochs: int = 100, batch: int = 4, lr: float = 0.01, momentum: float = 0.9,
        dampening: float = 0.9, weight_decay: float = 1e-3, optimizer: str = "sgd", rollback: float = 0.01,
        rollback_norm: float = 0.0, seed: int = 0,
    ):
        self._init_recipe(epochs, batch, lr, momentum, dampening, weight_decay, optimizer, rollback, seed)
        if scale != "auto":
            scale = float(check_positive("baseline++ scale", float(scale)))
        self.scale: float | str = scale
        self.rollback_norm = float(rollback_norm)
        self.weight_: F32 | None = None
        self.scale_: np.ndarray | None = None  # the scale used (0-d), resolved from 'auto' at fit time

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> BaselinePlusPlusHead:
        feats, labels, k = check_fit_inputs(feats, labels)
        rng = rng if rng is not None else np.random.default_rng(self.seed)
        n, d = feats.shape
        scale = cosine_scale(k) if self.scale == "auto" else float(self.scale)
        v, _ = uniform_init(rng, k, d, bias=False)
        order = draw_epochs(rng, n, self.epochs)
        xn, y1h = normalise_features(feats).astype(np.float32), one_hot(labels, k)
        params = {"v": v, "g": np.sqrt(ops.rowdot(v, v)).astype(np.float32)}
        opt = self._optimiser(params, {"v": self.rollback, "g": self.rollback_norm})
        for rows in self._batches(order):
            w = np.full((rows.shape[0], 1), 1.0 / rows.shape[0], dtype=np.float32)
            dv, dg = cosine_ce_grad(params["v"], params["g"], xn[rows], w, w * y1h[rows], scale)
            opt.step(params, {"v": dv, "g": dg}, self.lr)
        v, g = params["v"], params["g"]
        self.weight_ = (v * (g / np.sqrt(ops.rowdot(v, v)))[:, None]).astype(np.float32)
        self.scale_ = np.asarray(scale, dtype=np.float64)
        return self

    def predict_proba(self, feats: F32) -> F32:
        self._require_fitted()
        assert self.weight_ is not None and self.scale_ is not None
        feats = check_query(feats, self.weight_.shape[1], "baseline++ head")
        return softmax(float(self.scale_) * ops.mm(normalise_features(feats), self.weight_.T)).astype(np.float32)

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        steps = self.epochs * -(-n_support // self.batch)
        per_epoch = 2 * ops.mm_macs(n_support, dim, n_classes)  # logits + weight gradient
        per_step = 2 * ops.rowdot_macs(n_classes, dim)  # |v| and G . v
        ends = 2 * ops.rowdot_macs(n_classes, dim)  # |v| for g's init and for the stored weights
        return ops.rowdot_macs(n_support, dim) + self.epochs * per_epoch + steps * per_step + ends

    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        return ops.rowdot_macs(n_query, dim) + ops.mm_macs(n_query, dim, n_classes)

    def n_params(self, dim: int, n_classes: int) -> int:
        return n_classes * (dim + 1)
