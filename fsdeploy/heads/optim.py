"""Small numpy optimisers with PyTorch's update rules, plus OLOR's weight rollback.

Each optimiser updates a dict of parameter arrays in place from a dict of gradient arrays of the same
shapes: `opt.step(params, grads, lr)`. The learning rate is passed per step so schedules stay in the
head. Gradient arrays are scratch space: `step` may overwrite them. State buffers are created at the
first step with each parameter's dtype, so a float32 head stays float32 throughout.

The update rules follow torch.optim (Adam, SGD, Adadelta; weight decay added to the gradient, L2 style)
so that a head and a PyTorch loop fed the same batches agree to float rounding.

`Rollback` (the heads' `optimizer='rollback'`): after each optimiser step the weights are pulled back towards
their starting point with a constant ratio, theta_t = (1 - lambda) * theta_step + lambda * theta_0. That is the
form of OLOR's rollback (Lu et al., "One Step Learning, One Step Review", AAAI 2024) but not OLOR as published,
whose ratio follows the learning rate and decays by layer and whose anchor is a pretrained backbone: that is
`fsdeploy.train.olor`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np

Arrays = Mapping[str, np.ndarray]


class Optimiser(Protocol):
    """Anything with `step(params, grads, lr)` updating `params` in place."""

    def step(self, params: Arrays, grads: Arrays, lr: float) -> None: ...


class Adam:
    """torch.optim.Adam (amsgrad off), bias-corrected, weight decay added to the gradient.

    Moments are stored unscaled (m / (1 - beta1), v / (1 - beta2)) and the step size folded into the
    denominator, which saves elementwise passes per step; the arithmetic is the same as PyTorch's.
    """

    def __init__(self, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self._buf: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def step(self, params: Arrays, grads: Arrays, lr: float) -> None:
        self.t += 1
        bc1 = 1.0 - self.beta1**self.t
        bc2 = 1.0 - self.beta2**self.t
        a = lr * (1.0 - self.beta1) / bc1  # multiplies m / (1 - beta1)
        c = math.sqrt((1.0 - self.beta2) / bc2)  # multiplies sqrt(v / (1 - beta2))
        for name, p in params.items():
            g = grads[name]
            if name not in self._buf:
                self._buf[name] = (np.zeros_like(p), np.zeros_like(p), np.empty_like(p))
            m, v, tmp = self._buf[name]
            if self.weight_decay:
                np.multiply(p, self.weight_decay, out=tmp)
                g += tmp
            m *= self.beta1
            m += g
            np.multiply(g, g, out=g)
            v *= self.beta2
            v += g
            if a == 0.0:
                continue
            np.sqrt(v, out=tmp)
            tmp *= c / a
            tmp += self.eps / a
            np.divide(m, tmp, out=tmp)
            p -= tmp


class SGD:
    """torch.optim.SGD: weight decay, momentum with dampening (the first step seeds the buffer with the raw
    gradient, as PyTorch does); Nesterov is not offered."""

    def __init__(self, *, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0):
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self._buf: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def step(self, params: Arrays, grads: Arrays, lr: float) -> None:
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g += self.weight_decay * p
            if self.momentum:
                if name not in self._buf:
                    self._buf[name] = (g.copy(), np.empty_like(p))
                    buf, tmp = self._buf[name]
                else:
                    buf, tmp = self._buf[name]
                    buf *= self.momentum
                    np.multiply(g, 1.0 - self.dampening, out=tmp)
                    buf += tmp
                g = buf
            else:
                tmp = np.empty_like(p)
            np.multiply(g, lr, out=tmp)
            p -= tmp


class Adadelta:
    """torch.optim.Adadelta (Zeiler 2012): running averages of squared gradients and squared updates."""

    def __init__(self, *, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0):
        self.rho = float(rho)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self._buf: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def step(self, params: Arrays, grads: Arrays, lr: float) -> None:
        rho = self.rho
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g += self.weight_decay * p
            if name not in self._buf:
                self._buf[name] = (np.zeros_like(p), np.zeros_like(p), np.empty_like(p), np.empty_like(p))
            square_avg, acc_delta, delta, tmp = self._buf[name]  # no temporaries: beta is D x D
            square_avg *= rho
            np.multiply(g, g, out=tmp)
            tmp *= 1.0 - rho
            square_avg += tmp
            np.add(acc_delta, self.eps, out=delta)
            np.sqrt(delta, out=delta)
            np.add(square_avg, self.eps, out=tmp)
            np.sqrt(tmp, out=tmp)
            delta /= tmp
            delta *= g
            acc_delta *= rho
            np.multiply(delta, delta, out=tmp)
            tmp *= 1.0 - rho
            acc_delta += tmp
            delta *= lr
            p -= delta


class Rollback:
    """Constant-ratio weight rollback around any optimiser: after its step, theta <- (1 - lam) theta + lam theta_0.

    Args:
        inner: the optimiser that computes the step (Adam for the linear head, SGD for Baseline, ...).
        anchors: theta_0 per parameter name (copied here; usually the initial parameters).
        lam: rollback ratio per parameter name: a float, or an array broadcasting against the parameter
            (the linear head stores weights and bias in one array and passes one ratio per column).
            Names missing from `lam` are not rolled back.
    """

    def __init__(self, inner: Optimiser, anchors: Arrays, lam: Mapping[str, float | np.ndarray]):
        self.inner = inner
        self._keep: dict[str, np.ndarray] = {}
        self._pull: dict[str, np.ndarray] = {}
        for name, ratio in lam.items():
            anchor = np.array(anchors[name], copy=True)
            r = np.asarray(ratio, dtype=anchor.dtype)
            self._keep[name] = (1 - r).astype(anchor.dtype)
            self._pull[name] = (r * anchor).astype(anchor.dtype)

    def step(self, params: Arrays, grads: Arrays, lr: float) -> None:
        self.inner.step(params, grads, lr)
        for name, keep in self._keep.items():
            p = params[name]
            p *= keep
            p += self._pull[name]
