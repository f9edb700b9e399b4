"""TOAST: top-down attention steering for a frozen timm VisionTransformer.

Shi, Gai, Darrell, Wang, "TOAST: Transfer Learning via Attention Steering" (arXiv 2305.15542, also titled
"Refocusing Is Key to Transfer Learning"); top-down attention from Shi, Darrell, Wang, "Top-Down Visual
Attention from Analysis by Synthesis" (CVPR 2023, AbSViT).

The network runs the frozen ViT twice. Pass one gives output tokens (after the final norm). Each token is
weighted by cos(token, task vector xi) clamped to [0, 1], and a D x D `selector` picks channels. A feedback
path of one linear layer per block, applied from the top block down, turns that into a signal per block;
a per-block `to_value` map turns each signal into an additive term for that block's attention *values* in
pass two (queries and keys unchanged). Pass two's pooled output is the feature.

Choices that differ from the released code, and why:
- The value term is added to v after the value projection by a learned `to_value` (D -> attn_dim) map.
  The paper computes `W_v(linear2(s)) + b_v`; learning the product directly spans the same functions,
  drops the bias so a zero `to_value` is exactly the plain ViT, and saves one D x D matmul per block.
- Without a pre-tuned top-down path, the feedback linears start as identity (the released decoders start
  from trunc-normal(0.02) and are pre-tuned on ImageNet); identity keeps the signal's scale down 12 blocks.
- The patch embedding is computed once and shared by both passes (its input is the same image).
- Attention is written out (no fused SDPA) so both passes export to ONNX as plain MatMul/Softmax.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.errors import InvalidInput
from fsdeploy.modules.lora import LoRALinear, bare_linear

def _check_vit(backbone: nn.Module) -> None:
    """Raise InvalidInput unless `backbone` is a timm ViT whose blocks this module can re-run with value terms."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise InvalidInput(
            f"TOAST needs a timm VisionTransformer (vit_* models), got {type(backbone).__name__}; "
            "pick e.g. vit_small_patch16_224 or use another adapter for this family"
        )
    if getattr(backbone, "attn_pool", None) is not None:
        raise InvalidInput("TOAST supports ViTs pooled by cls token or average, not attention pooling ('map'); pick another vit_* model")
    for i, blk in enumerate(backbone.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise InvalidInput(
                f"block {i} of this ViT is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; TOAST re-runs only "
                "timm's standard pre-norm Block with Attention; pick a plain vit_* model"
            )


def attend_with_value_term(attn: nn.Module, x: torch.Tensor, value_term: torch.Tensor | None) -> torch.Tensor:
    """timm `Attention.forward` written out, with `value_term (B, N, attn_dim)` added to the values.

    The op order follows timm's non-fused path, so with no value term the result is bit-identical to it.
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if value_term is not None:
        v = v + value_term.reshape(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    q = q * attn.scale
    weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out)


def _run_block(blk: nn.Module, x: torch.Tensor, value_term: torch.Tensor | None) -> torch.Tensor:
    """timm `Block.forward` (pre-norm) with the attention replaced by `attend_with_value_term`."""
    x = x + blk.drop_path1(blk.ls1(attend_with_value_term(blk.attn, blk.norm1(x), value_term)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class TopDownViT(nn.Module):
    """Frozen ViT + TOAST top-down path; `forward(images (B, 3, H, W)) -> features (B, D)`.

    Args:
        backbone: a timm VisionTransformer (frozen here; its weights never change).
        lite_rank: 0 for full TOAST; r > 0 for TOAST-Lite, where every feedback and value map is a frozen
            base plus a trainable rank-r update (task vector and selector stay fully trainable).
        generator: source of the random initial task vector and LoRA factors.

    Raises:
        InvalidInput: the backbone is not a supported timm ViT.
    """

    def __init__(self, backbone: nn.Module, *, lite_rank: int = 0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_vit(backbone)
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        dim = backbone.embed_dim
        depth = len(backbone.blocks)
        attn_dim = backbone.blocks[0].attn.num_heads * backbone.blocks[0].attn.head_dim
        self.lite_rank = int(lite_rank)
        self.task_vector = nn.Parameter(torch.randn(dim, generator=generator))
        self.selector = _identity_linear(dim)
        feedback = [_identity_linear(dim) for _ in range(depth)]
        to_value = [_zero_linear(dim, attn_dim) for _ in range(depth)]
        if self.lite_rank:
            feedback = [LoRALinear(m, self.lite_rank, generator=generator) for m in feedback]
            to_value = [LoRALinear(m, self.lite_rank, generator=generator) for m in to_value]
        self.feedback = nn.ModuleList(feedback)  # feedback[l]: signal above block l -> signal at block l
        self.to_value = nn.ModuleList(to_value)  # to_value[l]: signal at block l -> value term of block l
        self.backbone.eval()

    def train(self, mode: bool = True) -> TopDownViT:
        """Switch the top-down path's mode; the backbone always stays in eval (frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + position embedding, shared by both passes: `(B, 3, H, W) -> (B, N, D)`."""
        bb = self.backbone
        return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))  # timm's own embedding step

    def run_blocks(
        self, tokens: torch.Tensor, value_terms: list[torch.Tensor] | None = None, *, streams: list[Any] | None = None
    ) -> torch.Tensor:
        """All blocks then the final norm; `value_terms[l]` is added to block l's values.

        `streams`, when given, collects each block's (input, output) tokens for the reconstruction loss.
        """
        x = tokens
        for index, blk in enumerate(self.backbone.blocks):
            before = x
            x = _run_block(blk, x, None if value_terms is None else value_terms[index])
            if streams is not None:
                streams.append((before, x))
        return self.backbone.norm(x)

    def top_down(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Feature selection then the feedback path: output tokens `(B, N, D)` -> value term per block."""
        direction = F.normalize(self.task_vector, dim=0).unsqueeze(1)  # (D, 1)
        relevance = (F.normalize(tokens, dim=-1) @ direction).clamp(0.0, 1.0)  # (B, N, 1)
        signal = self.selector(tokens * relevance)
        terms: list[torch.Tensor] = [signal] * len(self.feedback)
        for index in range(len(self.feedback) - 1, -1, -1):
            signal = self.feedback[index](signal)
            terms[index] = self.to_value[index](signal)
        return terms

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """timm's pooling for this model (cls token or average, then fc_norm): `(B, N, D) -> (B, D)`."""
        return self.backbone.forward_head(tokens, pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_streams(images)[0]

    def forward_with_streams(
        self, images: torch.Tensor, *, keep_streams: bool = False
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Both passes; returns features `(B, D)` and, if asked, pass two's per-block (input, output) tokens."""
        embedded = self.embed(images)
        first = self.run_blocks(embedded)
        streams: list[tuple[torch.Tensor, torch.Tensor]] = []
        second = self.run_blocks(embedded, self.top_down(first), streams=streams if keep_streams else None)
        return self.pool(second), streams

    def reconstruction_loss(self, streams: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The paper's variational regulariser: feedback[l] should map block l's output back to its input.

        Mean over blocks of the MSE between `feedback[l](output_l)` and `input_l`, both detached from the
        backbone (only the feedback path learns from it).
        """
        losses = [F.mse_loss(self.feedback[i](out.detach()), inp.detach()) for i, (inp, out) in enumerate(streams)]
        return torch.stack(losses).mean()

    def toast_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable top-down parameters (never the backbone's)."""
        return (p for p in self.parameters() if p.requires_grad)

    def toast_state_dict(self) -> dict[str, torch.Tensor]:
        """Top-down tensors only (frozen LoRA bases included), keyed as in `state_dict()`."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def merge_lora(self) -> TopDownViT:
        """Fold every LoRA update into a plain linear, in place; the function computed is unchanged."""
        for path in (self.feedback, self.to_value):
            for index, module in enumerate(path):
                if isinstance(module, LoRALinear):
                    path[index] = module.merged()
        self.lite_rank = 0
        return self


def _identity_linear(dim: int) -> nn.Linear:
    layer = bare_linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
    return layer


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = bare_linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.zero_()
    return layer


def count_toast_parameters(dim: int, depth: int, attn_dim: int, lite_rank: int = 0) -> int:
    """Closed-form number of trainable top-down parameters (task vector + selector + feedback path)."""
    fixed = dim + dim * dim
    if lite_rank == 0:
        return fixed + depth * (dim * dim + dim * attn_dim)
    return fixed + depth * lite_rank * ((dim + dim) + (dim + attn_dim))


def _tokens_for(backbone: nn.Module, img_size: int) -> tuple[int, int]:
    """(patches, tokens) the ViT sees for a square image of side `img_size`."""
    grid_h, grid_w = backbone.patch_embed.dynamic_feat_size((img_size, img_size))
    patches = grid_h * grid_w
    return patches, patches + backbone.num_prefix_tokens


def _blocks_macs(backbone: nn.Module, tokens: int) -> int:
    """MACs of all transformer blocks for one image: every Linear once per token, plus QK^T and AV."""
    total = 0
    for blk in backbone.blocks:
        total += tokens * sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear))
        attn_dim = blk.attn.num_heads * blk.attn.head_dim
        total += 2 * tokens * tokens * attn_dim
    return total


def vit_macs(backbone: nn.Module, img_size: int) -> int:
    """Inference multiply-accumulates of the plain ViT for one `img_size` x `img_size` image.

    Counts the patch convolution, every linear layer and the two attention matmuls; norms, softmax,
    activations and additions are not MACs and are left out.
    """
    patches, tokens = _tokens_for(backbone, img_size)
    return patches * backbone.patch_embed.proj.weight.numel() + _blocks_macs(backbone, tokens)


def toast_macs(module: TopDownViT, img_size: int) -> int:
    """Inference MACs of the full two-pass TOAST network for one image (LoRA counted as merged).

    = patch embedding once + blocks twice + cosine relevance (N*D) + selector (N*D*D)
      + feedback path (N * sum of feedback and value maps).
    """
    backbone = module.backbone
    patches, tokens = _tokens_for(backbone, img_size)
    dim = backbone.embed_dim

    def linear_macs(m: nn.Module) -> int:
        base = m.base if isinstance(m, LoRALinear) else m
        return base.in_features * base.out_features

    top_down = tokens * dim + tokens * linear_macs(module.selector)
    top_down += tokens * sum(linear_macs(m) for path in (module.feedback, module.to_value) for m in path)
    return patches * backbone.patch_embed.proj.weight.numel() + 2 * _blocks_macs(backbone, tokens) + top_down
