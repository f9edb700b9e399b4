"""The Contextual Squeeze-and-Excitation (CaSE) block.

Patacchiola, Bronskill, Shysheya, Hofmann, Nowozin, Turner, "Contextual Squeeze-and-Excitation for Efficient
Few-Shot Image Classification", NeurIPS 2022 (arXiv 2206.09843).

A CaSE block squeezes the *whole context (support) set* into one channel vector and excites it into one
scale per channel, γ, shared by every image of the task:

    z = mean of x over batch and space               (C,)
    z = (z - mean(z)) / sqrt(var(z) + 1e-5)           standardised across channels (biased variance)
    γ = 2 · sigmoid(MLP(z)),  MLP = Linear(C→h) → SiLU → Linear(h→h) → SiLU → Linear(h→C),  h = max(16, C // 64)

The last Linear starts at zero, so γ = 1 and the block is the identity until it is meta-trained.

Why `forward` returns γ and not γ ⊙ x: γ is task state. Computing it (context mode) and applying it
(`apply_gamma`, query mode) are separate steps, so the query graph takes γ as a named input (STYLE P6)
and never a buffer changed between calls.
"""
from __future__ import annotations

import torch
from torch import nn

STANDARDISE_EPS = 1e-5


def case_hidden(channels: int) -> int:
    """Hidden width of a CaSE MLP for `channels` inputs: max(16, C // 64)."""
    return max(16, channels // 64)


def case_param_count(channels: int) -> int:
    """Parameters of one CaSE block: three Linear layers with bias, 2Ch + h² + 2h + C."""
    h = case_hidden(channels)
    return channels * h + h + h * h + h + h * channels + channels


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the channel dim 1: `(N, C, ...)` -> `(C,)`."""
    return x.mean(dim=[0, *range(2, x.dim())])


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-image channel means: `(N, C, H, W)` -> `(N, C)`; `(N, C)` gives a fresh copy of itself.

    The mean over the batch of these equals `channel_mean(x)` because every image has the same H x W,
    which is what lets the chunked context pass sum them chunk by chunk.
    """
    return x.flatten(2).mean(2) if x.dim() > 2 else x.unsqueeze(-1).mean(-1)


def apply_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Scale channels: `x (N, C, ...)` times `gamma (C,)` broadcast over batch and space."""
    return x * gamma.reshape(1, -1, *([1] * (x.dim() - 2)))


class CaseBlock(nn.Module):
    """Maps context activations to their channel scales γ (C,); identity (γ = 1) at initialisation.

    Args:
        channels: C, the channel count of the activation it scales.
        hidden: MLP width; default max(16, C // 64) as in the paper.
    """

    def __init__(self, channels: int, *, hidden: int | None = None) -> None:
        super().__init__()
        self.channels = int(channels)
        h = int(hidden) if hidden is not None else case_hidden(self.channels)
        self.mlp = nn.Sequential(
            nn.Linear(self.channels, h),
            nn.SiLU(),
            nn.Linear(h, h),
            nn.SiLU(),
            nn.Linear(h, self.channels),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """γ (C,) of a context batch `x (N, C, H, W)` or `(N, C)`: squeeze over batch and space, then excite."""
        return self.gamma_from_mean(channel_mean(x))

    def gamma_from_mean(self, z: torch.Tensor) -> torch.Tensor:
        """γ (C,) from the context mean `z (C,)`; the chunked context pass calls this with a mean summed over chunks."""
        z = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + STANDARDISE_EPS)
        return 2.0 * torch.sigmoid(self.mlp(z))

    def reset_for_metatraining_(self, generator: torch.Generator | None = None) -> None:
        """UpperCaSE's start before meta-training from scratch: first two Linears U(±1/√out), zero bias; last zero.

        The official EfficientNet initialises every Linear it holds this way (CaSE blocks included), then
        `CaSE.reset_parameters` zeroes the last one again; PyTorch's default (Kaiming-uniform on the input
        width) is a different start.

        Args:
            generator: torch generator for the uniform draws (None: torch's global one).
        """
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                bound = 1.0 / layer.out_features**0.5
                nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.mlp[0].out_features}"
