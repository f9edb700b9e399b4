"""TOAST: top-down attention steering for a frozen timm VisionTransformer.

Shi, Gai, Darrell, Wang, "TOAST: Transfer Learning via Attention Steering" (arXiv 2305.15542, also titled
"Refocusing Is Key to Transfer Learning"); top-down attention from Shi, Darrell, Wang, "Top-Down Visual
Attention from Analysis by Synthesis" (CVPR 2023, AbSViT). Released code: bfshi/TOAST
`visual_classification/src/models/vit/vit_top_down.py` and `vit_models.py`; bfshi/AbSViT `models/absvit.py`.

The network runs the frozen ViT twice. Pass one gives output tokens (after the final norm). Each token is
weighted by cos(token, task vector) clamped to [0, 1], and a D x D `selector` (the released
`top_down_transform`, identity at init) picks channels. A decoder per block, applied from the top block down,
turns that into a signal per block: `feedback[l]` (the decoder's `linear`) carries the signal down and
`to_value[l]` (its `linear2`) gives block l's top-down input td_l. In pass two, block l's attention values get
`qkv(td_l)[2]` added, i.e. the backbone's own frozen value projection *with its bias* (queries and keys
unchanged). Pass two's pooled output is the feature.

Released recipe (the default): decoders and task vector start from trunc-normal(0.02) / randn (pre-tuned
on a generic dataset first: `fsdeploy.train.toast.pretune_toast`); the selector is frozen in full TOAST and
trained in TOAST-Lite; the variational loss is 0.1 x the sum over blocks; stochastic depth (drop path) in the
frozen blocks while training.

Named deviations (options, off by default):
- `value_path="learned"`: a learned D -> attn_dim map, without bias, adds straight to v (fsdeploy's format-1
  checkpoints). With `decoder_init="identity"` (feedback identity, value map zero) the untuned network is
  exactly the plain ViT, which is useful without a pre-tuned top-down path; the released path adds at least
  the value bias even when the decoders are zero.
- `train_selector=True/False` overrides the released choice (frozen in TOAST, trained in TOAST-Lite).
Also: the patch embedding is computed once and shared by both passes (same image, same result), and
attention is written out (no fused SDPA) so both passes export to ONNX as plain MatMul/Softmax.
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


VALUE_PATHS = ("released", "learned")
DECODER_INITS = ("trunc_normal", "identity")


def value_projection(attn: nn.Module, td: torch.Tensor) -> torch.Tensor:
    """`qkv(td)[2]` of the released code: the frozen value rows of `attn.qkv`, bias included: `(B, N, D) -> (B, N, attn_dim)`."""
    attn_dim = attn.num_heads * attn.head_dim
    weight = attn.qkv.weight[2 * attn_dim : 3 * attn_dim]
    bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * attn_dim : 3 * attn_dim]
    return F.linear(td, weight, bias)


def _drop_path(x: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic depth as timm's `DropPath` (per sample, kept paths scaled by 1/keep), drawn from `generator`."""
    if rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep, generator=generator)
    return x * (mask / keep).to(device=x.device, dtype=x.dtype)


def _run_block(
    blk: nn.Module, x: torch.Tensor, value_term: torch.Tensor | None, drop: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """timm `Block.forward` (pre-norm) with the attention replaced by `attend_with_value_term`.

    `drop` > 0 applies stochastic depth to both residual branches (training only; the caller decides).
    """
    x = x + _drop_path(blk.drop_path1(blk.ls1(attend_with_value_term(blk.attn, blk.norm1(x), value_term))), drop, generator)
    return x + _drop_path(blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), drop, generator)


class TopDownViT(nn.Module):
    """Frozen ViT + TOAST top-down path; `forward(images (B, 3, H, W)) -> features (B, D)`.

    Args:
        backbone: a timm VisionTransformer (frozen here; its weights never change).
        lite_rank: 0 for full TOAST; r > 0 for TOAST-Lite, where every decoder linear is a frozen base plus a
            trainable rank-r LoRA update (released: r=4).
        lora_alpha: TOAST-Lite's update is scaled by lora_alpha / r (loralib's default 1, as released).
        value_path: "released" adds `qkv(td)[2]` (frozen value projection with bias) to the values;
            "learned" adds a learned bias-free D -> attn_dim map of the signal (fsdeploy format 1).
        decoder_init: "trunc_normal" (std 0.02, released; pre-tune before downstream tuning) or "identity"
            (feedback identity, value map zero: the untuned network is the plain ViT with value_path="learned").
        train_selector: None = released (frozen in full TOAST, trained in TOAST-Lite); True/False forces it.
        drop_path: stochastic-depth rate of the last block while training, linear from 0 over the blocks
            (released: 0.1); 0 = off. Eval mode never drops.
        generator: source of the initial task vector, decoders and LoRA factors, and of drop-path draws.

    Raises:
        InvalidInput: the backbone is not a supported timm ViT, or an unknown option.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        lite_rank: int = 0,
        lora_alpha: float = 1.0,
        value_path: str = "released",
        decoder_init: str = "trunc_normal",
        train_selector: bool | None = None,
        drop_path: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_vit(backbone)
        if value_path not in VALUE_PATHS:
            raise InvalidInput(f"unknown TOAST value_path {value_path!r}; pick one of {', '.join(VALUE_PATHS)}")
        if decoder_init not in DECODER_INITS:
            raise InvalidInput(f"unknown TOAST decoder_init {decoder_init!r}; pick one of {', '.join(DECODER_INITS)}")
        if not 0.0 <= drop_path < 1.0:
            raise InvalidInput(f"TOAST drop_path must be in [0, 1), got {drop_path}; the released rate is 0.1")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        dim = backbone.embed_dim
        depth = len(backbone.blocks)
        attn_dim = backbone.blocks[0].attn.num_heads * backbone.blocks[0].attn.head_dim
        self.value_path = value_path
        self.decoder_init = decoder_init
        self.drop_path = float(drop_path)
        self.drop_rates = [float(r) for r in torch.linspace(0.0, self.drop_path, depth)]  # timm's stochastic depth decay rule
        self._generator = generator
        self.lite_rank = 0
        self.lora_alpha = float(lora_alpha)
        self.task_vector = nn.Parameter(torch.randn(dim, generator=generator))
        self.selector = _identity_linear(dim)
        out_dim = dim if value_path == "released" else attn_dim
        if decoder_init == "trunc_normal":
            feedback = [_trunc_normal_linear(dim, dim, generator) for _ in range(depth)]
            to_value = [_trunc_normal_linear(dim, out_dim, generator) for _ in range(depth)]
        else:
            feedback = [_identity_linear(dim) for _ in range(depth)]
            to_value = [_zero_linear(dim, out_dim) for _ in range(depth)]
        self.feedback = nn.ModuleList(feedback)  # feedback[l]: signal above block l -> signal at block l (decoder.linear)
        self.to_value = nn.ModuleList(to_value)  # to_value[l]: signal at block l -> top-down input of block l (decoder.linear2)
        self.train_selector = train_selector
        if lite_rank:
            self.add_lora(lite_rank, alpha=lora_alpha, generator=generator)
        else:
            self._set_selector_grad()
        self.backbone.eval()

    def _set_selector_grad(self) -> None:
        trained = self.lite_rank > 0 if self.train_selector is None else bool(self.train_selector)
        self.selector.weight.requires_grad_(trained)

    def add_lora(self, rank: int, *, alpha: float = 1.0, generator: torch.Generator | None = None) -> TopDownViT:
        """TOAST-Lite: wrap every decoder linear (its current weights become the frozen base) in a rank-r LoRA.

        As the released `toast-lite` mode: only the LoRA factors, the task vector and the selector learn.
        """
        if self.lite_rank:
            raise InvalidInput("this TOAST module already has LoRA; merge_lora() first")
        for path in (self.feedback, self.to_value):
            for index, module in enumerate(path):
                path[index] = LoRALinear(module, rank, alpha=alpha, generator=generator)
        self.lite_rank = int(rank)
        self.lora_alpha = float(alpha)
        self._set_selector_grad()
        return self

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
        In training mode, blocks drop paths at `drop_rates` (both passes, as the released code).
        """
        x = tokens
        for index, blk in enumerate(self.backbone.blocks):
            before = x
            drop = self.drop_rates[index] if self.training else 0.0
            x = _run_block(blk, x, None if value_terms is None else value_terms[index], drop, self._generator)
            if streams is not None:
                streams.append((before, x))
        return self.backbone.norm(x)

    def top_down_inputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Feature selection then the decoders: output tokens `(B, N, D)` -> top-down input td_l per block."""
        direction = F.normalize(self.task_vector, dim=0).unsqueeze(1)  # (D, 1)
        relevance = (F.normalize(tokens, dim=-1) @ direction).clamp(0.0, 1.0)  # (B, N, 1)
        signal = self.selector(tokens * relevance)
        inputs: list[torch.Tensor] = [signal] * len(self.feedback)
        for index in range(len(self.feedback) - 1, -1, -1):
            signal = self.feedback[index](signal)
            inputs[index] = self.to_value[index](signal)
        return inputs

    def top_down(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Output tokens `(B, N, D)` -> the term added to each block's attention values `(B, N, attn_dim)`."""
        inputs = self.top_down_inputs(tokens)
        if self.value_path == "learned":
            return inputs
        return [value_projection(blk.attn, td) for blk, td in zip(self.backbone.blocks, inputs)]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """timm's pooling for this model (cls token or average, then fc_norm): `(B, N, D) -> (B, D)`."""
        return self.backbone.forward_head(tokens, pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_streams(images)[0]

    def forward_with_streams(
        self, images: torch.Tensor, *, keep_streams: bool = False, with_first: bool = False
    ) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Both passes; returns features `(B, D)` and, if asked, pass two's per-block (input, output) tokens.

        `with_first=True` returns `(first-pass features, second-pass features)` in place of the features
        (pre-tuning puts the head on both passes, as AbSViT).
        """
        embedded = self.embed(images)
        first = self.run_blocks(embedded)
        streams: list[tuple[torch.Tensor, torch.Tensor]] = []
        second = self.run_blocks(embedded, self.top_down(first), streams=streams if keep_streams else None)
        if with_first:
            return (self.pool(first), self.pool(second)), streams
        return self.pool(second), streams

    def reconstruction_loss(self, streams: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The variational regulariser, unweighted: `feedback[l]` should map block l's output back to its input.

        Sum over blocks (as the released `var_loss`, which then multiplies by 0.1) of the MSE between
        `feedback[l](output_l)` and `input_l`, both detached (only the feedback path learns from it).
        """
        losses = [F.mse_loss(self.feedback[i](out.detach()), inp.detach()) for i, (inp, out) in enumerate(streams)]
        return torch.stack(losses).sum()

    def toast_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable top-down parameters (never the backbone's)."""
        return (p for p in self.parameters() if p.requires_grad)

    def toast_state_dict(self) -> dict[str, torch.Tensor]:
        """Top-down tensors only (frozen LoRA bases and selector included), keyed as in `state_dict()`."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def merge_lora(self) -> TopDownViT:
        """Fold every LoRA update into a plain linear, in place; the function computed is unchanged."""
        for path in (self.feedback, self.to_value):
            for index, module in enumerate(path):
                if isinstance(module, LoRALinear):
                    path[index] = module.merged()
        self.lite_rank = 0
        return self


def _trunc_normal_linear(in_features: int, out_features: int, generator: torch.Generator | None) -> nn.Linear:
    """Bias-free linear at timm's ViT init, trunc_normal(std=0.02) (the released decoders' start)."""
    layer = bare_linear(in_features, out_features)
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=0.02, generator=generator)
    return layer


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


def count_toast_parameters(dim: int, depth: int, attn_dim: int, lite_rank: int = 0, *, value_path: str = "released",
                           train_selector: bool | None = None) -> int:
    """Closed-form number of trainable top-down parameters (task vector [+ selector] + decoders or their LoRA)."""
    out_dim = dim if value_path == "released" else attn_dim
    selector = (lite_rank > 0) if train_selector is None else train_selector
    fixed = dim + (dim * dim if selector else 0)
    if lite_rank == 0:
        return fixed + depth * (dim * dim + dim * out_dim)
    return fixed + depth * lite_rank * ((dim + dim) + (dim + out_dim))


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
      + decoders (N * sum of feedback and value maps) [+ the frozen value projection per block, released path].
    """
    backbone = module.backbone
    patches, tokens = _tokens_for(backbone, img_size)
    dim = backbone.embed_dim

    def linear_macs(m: nn.Module) -> int:
        base = m.base if isinstance(m, LoRALinear) else m
        return base.in_features * base.out_features

    top_down = tokens * dim + tokens * linear_macs(module.selector)
    top_down += tokens * sum(linear_macs(m) for path in (module.feedback, module.to_value) for m in path)
    if module.value_path == "released":  # qkv(td)[2]: the frozen value projection of every block
        top_down += tokens * sum(dim * blk.attn.num_heads * blk.attn.head_dim for blk in backbone.blocks)
    return patches * backbone.patch_embed.proj.weight.numel() + 2 * _blocks_macs(backbone, tokens) + top_down
