"""LoRA: a frozen linear map plus a trainable rank-r update (Hu et al., ICLR 2022), as TOAST-Lite uses it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.errors import InvalidInput


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable rank-r update: y = x W^T + (alpha / r) (x A^T) B^T (TOAST-Lite).

    As loralib's `lora.Linear`, which the released TOAST-Lite uses (r=4 and loralib's default alpha=1, so
    the update is scaled by 1/4): A starts at kaiming-uniform(a=sqrt(5)), i.e. U(+-1/sqrt(in)), B at zero,
    so the wrapped map is unchanged until tuning moves it.

    Args:
        base: the map to wrap (frozen here).
        rank: r >= 1.
        alpha: the update is scaled by alpha / r (loralib's `lora_alpha`, default 1). Pass alpha=rank for
            the unscaled update fsdeploy's TOAST checkpoints of format 1 were tuned with.
        generator: source of A's draw.
    """

    def __init__(self, base: nn.Linear, rank: int, *, alpha: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise InvalidInput(f"LoRA rank must be >= 1, got {rank}; pass lite_rank=0 for full TOAST")
        if not alpha > 0:
            raise InvalidInput(f"LoRA alpha must be > 0, got {alpha}; loralib's default (and TOAST-Lite's) is 1")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        """One plain linear with the update folded in (what inference and export use)."""
        out = bare_linear(self.base.in_features, self.base.out_features)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * (self.lora_b @ self.lora_a))
        return out


def bare_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free linear whose weight is left for the caller to set (draws nothing from the global RNG)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)
