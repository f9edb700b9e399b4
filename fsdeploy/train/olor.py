"""OLOR as published: Adam with weight rollback towards the pretrained weights, decayed by layer.

Lu et al., "One Step Learning, One Step Review", AAAI 2024; official code rainbow-xiao/OLOR-AAAI-2024
(`OLOR/utils/AdamB.py`, `OLOR/train.py`, `OLOR/config.py`). For the pretrained (backbone) tensors, numbered
i = 0..L in parameter order (shallow first), each step is

    u   = Adam's bias-corrected update m̂ / (√v̂ + ε)          (no weight decay)
    θ  ← θ − η_t (1 − λ) u − λ (θ − θ_0),   λ = η_t · b_i,
    b_i = b_min + (1 − i / L)^p · (b_max − b_min),

i.e. the Adam step followed by θ ← (1 − λ) θ + λ θ_0 with θ_0 the pretrained weights. The published
setting is b_max = κ / η_0 with κ = 0.01 (η_0 the base learning rate), b_min = 0, p = 1: λ starts at κ on
the first tensor and falls linearly to 0 on the last, and scales with the learning-rate schedule.
Tensors of a new head get plain Adam (no rollback, no weight decay).

Two deliberate differences from `AdamB.py`, both at its edges: with a single pretrained tensor (L = 0)
it divides by zero, here that tensor gets b_max; and it writes 1 − (i/L + ε) with Adam's ε = 1e-8 inside
the power, which makes the last tensor's level −1e-8·b_max (NaN for fractional p), here 1 − i/L exactly
(λ differs by at most 1e-8·κ).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

KAPPA = 0.01  # config.py: back_level_max = 0.01, divided by the base lr in train.py
POWER = 1.0  # config.py: back_pow = 1


def rollback_levels(n_tensors: int, b_max: float, b_min: float = 0.0, power: float = POWER) -> list[float]:
    """b_i for tensors 0..n-1: b_min + (1 - i/L)^power (b_max - b_min), L = n - 1 (a lone tensor gets b_max)."""
    last = max(n_tensors - 1, 1)
    return [b_min + (1.0 - i / last) ** power * (b_max - b_min) if n_tensors > 1 else b_max for i in range(n_tensors)]


class OLORAdam(torch.optim.Optimizer):
    """Adam whose pretrained tensors are rolled back towards their starting values each step (OLOR).

    Args:
        pretrained: backbone tensors, in layer order (shallow first); their values now are θ_0.
        new: tensors of a new head (plain Adam).
        lr: base learning rate η_0 (change `param_groups[i]["lr"]` for a schedule; λ follows it).
        kappa: rollback ratio of the first tensor at lr η_0 (b_max = kappa / lr).
        kappa_min: the same for the last tensor (b_min = kappa_min / lr).
        power: decay power p over the tensor index.
        betas, eps: Adam's.

    Raises:
        ValueError: no tensors at all, or a negative lr / kappa.
    """

    def __init__(
        self, pretrained: Iterable[torch.Tensor], new: Iterable[torch.Tensor] = (), *, lr: float = 1e-3,
        kappa: float = KAPPA, kappa_min: float = 0.0, power: float = POWER, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0 or kappa < 0 or kappa_min < 0:
            raise ValueError(f"OLOR needs lr > 0 and kappa, kappa_min >= 0; got {lr}, {kappa}, {kappa_min}")
        pre, head = list(pretrained), list(new)
        groups = [{"params": pre, "rollback": True}] if pre else []
        if head:
            groups.append({"params": head, "rollback": False})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "rollback": False})
        levels = rollback_levels(len(pre), kappa / lr, kappa_min / lr, power)
        for p, b in zip(pre, levels):
            self.state[p]["anchor"] = p.detach().clone()
            self.state[p]["level"] = b

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One Adam step, then the rollback of the pretrained tensors."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            bc1, bc2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "m" not in state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + group["eps"])
                p.sub_(update, alpha=lr)
                if group["rollback"]:
                    lam = lr * state["level"]
                    p.mul_(1 - lam).add_(state["anchor"], alpha=lam)
