"""LoRA: a frozen linear map plus a trainable rank-r update (Hu et al., ICLR 2022), as TOAST-Lite uses it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.errors import InvalidInput


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable rank-r update: y = x W^T + (x A^T) B^T (TOAST-Lite).

    B starts at zero, so the wrapped map is unchanged until tuning moves it.
    """

    def __init__(self, base: nn.Linear, rank: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise InvalidInput(f"LoRA rank must be >= 1, got {rank}; pass lite_rank=0 for full TOAST")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        """One plain linear with the update folded in (what inference and export use)."""
        out = bare_linear(self.base.in_features, self.base.out_features)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.lora_b @ self.lora_a)
        return out


def bare_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free linear whose weight is left for the caller to set (draws nothing from the global RNG)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)

