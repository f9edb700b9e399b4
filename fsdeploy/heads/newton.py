"""Linear head solved by Newton's method in the span of the support features: few MACs, no batches.

The objective is L2-regularised multinomial logistic regression on bias-augmented features x = [f, c]:
    f(W) = mean_i CE(W x_i, y_i) + lam/2 |W|^2,   lam = l2 * mean_i |x_i|^2,
where the bias input c is the root-mean-square support feature norm rather than 1. Both choices tie the
regularisation to the feature scale, so predictions do not change when the features are rescaled.

Design (cost is what matters on device; the 500-step Adam head spends 2 * 500 * min(N, 128) * (D+1) * K
MACs). By the representer theorem the minimiser is W = A X for coefficients A (K, N), and logits are
S = G A^T with the Gram matrix G = X X^T. After one product to build G (N^2 D MACs) every step works on
N x K arrays (the bias input only adds c^2 to every entry of G):
- Newton steps (truncated Newton / Newton-CG, Nocedal & Wright ch. 7): the Newton system is solved by
  conjugate gradients in the metric of G (the W-space inner product <aX, bX> = tr(a G b^T)), so the
  Hessian is never formed; each CG step costs one N x N x K product.
- Line search for free: logits are linear in A, so the objective at A + t d needs only S + t G d^T,
  elementwise work; the best of a fixed grid of t (1, 1/2, ..., 1/32, 0) is taken, which keeps the
  iteration monotone and the MAC count independent of the data.
- Fixed iteration counts, so `fit_macs` is exact: N^2 D + steps * (N^2 K + cg * (N^2 K + 3 N K)
  + 4 N K) + K N D (the last term maps A back to W; `standardise` adds N D).
With the defaults that is 135x fewer MACs than the Adam head at 5-way 5-shot (D=1280) and 65x at 10-way
10-shot; the saving shrinks as N grows (every CG step costs N^2 K): 3x at N=500, K=50, D=384.
The solve runs in float64 (Gram matrices of ReLU features are badly conditioned) and W is kept in float32.

`standardise=True` (default) divides every feature by its support standard deviation before the fit (folded
into W afterwards; N D more MACs). Adam's per-coordinate step sizes give the Adam head a similar
per-feature scale invariance, and without it the Newton head falls far behind the Adam head when feature
dimensions have very different noise levels (synthetic 5-way 5-shot, D=1280: 52% vs 71%; standardised: 99%),
at a cost of about 2 points on isotropic features. `standardise=False` gives the plain weight-decayed
cross-entropy objective on the raw features.
"""
from __future__ import annotations

import numpy as np

from fsdeploy.heads import ops
from fsdeploy.heads.base import F32, I64, check_fit_inputs, log_softmax, one_hot, register_head, softmax
from fsdeploy.heads.common import check_positive
from fsdeploy.heads.linear import AffineHead

STEP_GRID = np.array([1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0])
STD_SHRINK = 1e-3  # std_d = sqrt(var_d + 1e-3 * mean var): constant or dead features stay finite


def _fdot(a: np.ndarray, b: np.ndarray) -> float:
    """Frobenius inner product of two same-shape arrays (a.size MACs)."""
    return float(ops.rowdot(np.reshape(a, (1, -1)), np.reshape(b, (1, -1)))[0])


def objective(logits: np.ndarray, labels: I64, penalty: np.ndarray | float, lam: float) -> np.ndarray:
    """mean CE + lam/2 * penalty for logits (..., N, K) and squared norms `penalty` (...)."""
    n = labels.shape[0]
    target = np.take_along_axis(log_softmax(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape),
                                np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)), axis=-1)[..., 0]
    return -target.sum(axis=-1) / n + 0.5 * lam * np.asarray(penalty)


def newton_dual(
    gram: np.ndarray, labels: I64, n_classes: int, lam: float, steps: int, cg_steps: int,
) -> np.ndarray:
    """Coefficients A (K, N) minimising mean CE(G A^T) + lam/2 tr(A G A^T) by Newton-CG in the G metric."""
    n = gram.shape[0]
    y1h = one_hot(labels, n_classes).astype(gram.dtype)
    a = np.zeros((n_classes, n))
    s = np.zeros((n, n_classes))  # logits, G A^T
    for _ in range(steps):
        p = softmax(s.copy())
        resid_logits = (p - y1h) / n
        # natural gradient: resid^T + lam A; CG on H d = -gradient, tracking G (.)^T of every vector
        r = -(resid_logits.T + lam * a)
        gr = -(ops.mm(gram, resid_logits) + lam * s)
        d, gd = np.zeros_like(a), np.zeros_like(s)
        q, gq = r.copy(), gr.copy()
        rr = _fdot(r, gr.T)
        for _ in range(cg_steps):
            curv = p * gq - p * ops.rowdot(p, gq)[:, None]  # softmax Jacobian applied to G q^T
            hq = curv.T / n + lam * q
            qhq = _fdot(hq, gq.T)
            alpha = rr / qhq if qhq > 0 else 0.0
            d += alpha * q
            gd += alpha * gq
            r -= alpha * hq
            gr -= alpha * ops.mm(gram, hq.T)
            rr_new = _fdot(r, gr.T)
            beta = rr_new / rr if rr > 0 else 0.0
            rr = rr_new
            q = r + beta * q
            gq = gr + beta * gq
        aa, ad, dd = _fdot(a, s.T), _fdot(a, gd.T), _fdot(d, gd.T)
        trial = s[None] + STEP_GRID[:, None, None] * gd[None]
        f = objective(trial, labels, aa + 2 * STEP_GRID * ad + STEP_GRID**2 * dd, lam)
        t = float(STEP_GRID[int(np.argmin(f))])
        a += t * d
        s += t * gd
    return a


@register_head("linear-newton")
class LinearNewtonHead(AffineHead):
    """L2-regularised linear classifier fitted by Newton-CG in the span of the support features.

    Args:
        l2: ridge strength relative to the mean squared norm of the bias-augmented support features.
        steps: Newton steps (each ends with the grid line search).
        cg_steps: conjugate-gradient steps per Newton step.
        standardise: divide features by their support standard deviation first (see the module docstring).
        seed: unused (the fit is deterministic); kept so every head takes one.
    """

    _options = ("l2", "steps", "cg_steps", "standardise", "seed")

    def __init__(self, l2: float = 1e-3, steps: int = 6, cg_steps: int = 8, standardise: bool = True, seed: int = 0):
        self.l2 = float(check_positive("linear-newton l2", l2))
        self.steps = int(check_positive("linear-newton steps", steps))
        self.cg_steps = int(check_positive("linear-newton cg_steps", cg_steps))
        self.standardise = bool(standardise)
        self.seed = int(seed)

    def fit(self, feats: F32, labels: I64, rng: np.random.Generator | None = None) -> LinearNewtonHead:
        feats, labels, k = check_fit_inputs(feats, labels)
        x = feats.astype(np.float64)
        n = x.shape[0]
        if self.standardise:
            centred = x - x.mean(axis=0)
            var = ops.rowdot(centred.T, centred.T) / n
            std = np.sqrt(var + STD_SHRINK * var.mean())
            std[std == 0] = 1.0  # every feature constant: nothing to rescale
            x /= std
        gram = ops.mm(x, x.T)
        bias_input_sq = float(np.trace(gram)) / n  # c^2: the augmented Gram matrix is G + c^2
        gram += bias_input_sq
        lam = self.l2 * float(np.trace(gram)) / n
        coef = newton_dual(gram, labels, k, lam, self.steps, self.cg_steps)
        weight = ops.mm(coef, x)
        if self.standardise:
            weight /= std
        self.weight_ = weight.astype(np.float32)
        self.bias_ = (bias_input_sq * coef.sum(axis=1)).astype(np.float32)  # c * (coefficients of the c column)
        return self

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        n, k = n_support, n_classes
        cg = ops.mm_macs(n, n, k) + 3 * n * k  # G q^T update, softmax-Jacobian dots, two inner products
        newton = ops.mm_macs(n, n, k) + n * k + self.cg_steps * cg + 3 * n * k  # G R, <r,r>, line search dots
        std = ops.rowdot_macs(dim, n) if self.standardise else 0
        return std + ops.mm_macs(n, dim, n) + self.steps * newton + ops.mm_macs(k, n, dim)
