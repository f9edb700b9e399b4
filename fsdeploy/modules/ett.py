"""eTT: attentive prefix tuning + domain residual adapters for a frozen timm VisionTransformer.

Xu, Xiong, Tang, Chen, Yang, Wang, "Exploring Efficient Few-shot Adaptation for Vision Transformers",
TMLR 2023; official code chmxu/eTT_TMLR2022 (`models/vit_dino.py`, `models/pa_prefix.py`,
`test_extractor_pa_vit_prefix.py`). The pieces, as the official code builds them:

- attentive prototypes (`vit_dino.py:381-393`, `test_extractor_pa_vit_prefix.py:28-33`): the last block's
  attention logits of the CLS query over the patch tokens, softmaxed over the patches, weight the *input*
  patch embeddings (patch projection + position embedding); mean over heads; class means of those;
- prefixes (`pa_prefix.py:92-99,115-117`): one prefix token per class, initialised from the attentive
  prototypes and mapped by `control_trans` = Linear(D, D/2) -> Tanh -> Linear(D/2, depth * 2 * D) into a
  key and a value per block and head, concatenated in front of that block's keys and values
  (`vit_dino.py:129-137`; the prefix is not passed through the qkv projection);
- domain residual adapter, DRA (`vit_dino.py:170-206`): a learned offset vector added to the attention
  branch and one added to the MLP branch of every block, zeros at init. Offsets fold exactly into the
  biases of `attn.proj` and `mlp.fc2` (with timm's identity LayerScale), which is how the task graph stores them;
- the prefix regulariser `PR` (`pa_prefix.py:15-62`): a DINO-style cross-entropy between a projection of
  the current prefix (student, temperature 0.1) and of its initial value (teacher, temperature 0.04, a
  running centre with momentum 0.9), both L2-normalised first; the projection Linear(D, 64) trains too.

Attention is written out (no fused SDPA) so the task graph exports to ONNX as plain MatMul/Softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.errors import InvalidInput

PR_DIM = 64  # the regulariser's projection size (pa_prefix.py:16, out_dim=64)
STUDENT_TEMP = 0.1  # pa_prefix.py:17
TEACHER_TEMP = 0.04  # pa_prefix.py:16 (warm-up and final teacher temperatures are both 0.04)
CENTER_MOMENTUM = 0.9  # pa_prefix.py:18
PREFIX_KEY = "ett/prefix"  # task-state array of the prefix keys/values (the torch backend rebuilds the task graph from it)


def check_vit(backbone: nn.Module) -> None:
    """Raise InvalidInput unless `backbone` is a plain timm ViT with a CLS token (what eTT's pieces need)."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise InvalidInput(f"the ett adapter needs a timm VisionTransformer (vit_* models), got {type(backbone).__name__}; "
                           "use tsa or bn-affine for CNNs")
    if backbone.cls_token is None or getattr(backbone, "attn_pool", None) is not None:
        raise InvalidInput("the ett adapter needs a ViT with a class token (its attentive prototypes use the CLS attention)")
    for i, blk in enumerate(backbone.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise InvalidInput(f"block {i} of this ViT is {type(blk).__name__}; the ett adapter re-runs timm's standard Block only")
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            raise InvalidInput("the ett adapter folds its offsets into biases, which needs ViT blocks without LayerScale")


def prefix_attention(attn: nn.Module, x: torch.Tensor, pre_k: torch.Tensor | None = None,
                     pre_v: torch.Tensor | None = None) -> torch.Tensor:
    """timm `Attention.forward` written out, with prefix keys/values `(heads, P, head_dim)` in front.

    `pre_k`/`pre_v` are concatenated before the tokens' own keys/values (the same for every image), so the
    queries also attend to the P prefix tokens; with no prefix this is timm's non-fused path.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if pre_k is not None and pre_v is not None:
        k = torch.cat([pre_k.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([pre_v.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    q = q * attn.scale
    weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    return attn.proj(attn.norm(out))


def run_block(blk: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None = None,
              offsets: torch.Tensor | None = None) -> torch.Tensor:
    """timm's pre-norm Block with prefix attention (`prefix (2, heads, P, head_dim)`) and DRA `offsets (2, D)`."""
    y = prefix_attention(blk.attn, blk.norm1(x), *(prefix.unbind(0) if prefix is not None else (None, None)))
    if offsets is not None:
        y = y + offsets[0]
    x = x + blk.drop_path1(blk.ls1(y))
    y = blk.mlp(blk.norm2(x))
    if offsets is not None:
        y = y + offsets[1]
    return x + blk.drop_path2(blk.ls2(y))


def embed(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's token embedding (patches + class token + positions): `(B, 3, H, W) -> (B, N, D)`."""
    return backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))


@torch.no_grad()
def attentive_embeddings(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per image, the input patch embeddings weighted by the last block's CLS attention: `(B, D)`.

    The weights are softmax over the patches of the last block's scaled q.k logits of the CLS query (the
    CLS column dropped before the softmax), one set per head; the weighted sums are averaged over heads.
    """
    check_vit(backbone)
    x = embed(backbone, images)
    start = backbone.num_prefix_tokens
    patches = x[:, start:]
    for blk in backbone.blocks[:-1]:
        x = blk(x)
    attn = backbone.blocks[-1].attn
    y = backbone.blocks[-1].norm1(x)
    batch, tokens, _ = y.shape
    qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N): the CLS query's row
    weights = logits[:, :, 0, start:].softmax(dim=-1)  # (B, H, patches)
    return (weights.unsqueeze(-1) * patches.unsqueeze(1)).sum(2).mean(1)


def attentive_prototypes(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means `(n_way, D)` of `attentive_embeddings`: eTT's prefix initialisation."""
    emb = attentive_embeddings(backbone, images)
    return torch.stack([emb[labels == c].mean(0) for c in range(n_way)])


class ETTViT(nn.Module):
    """Frozen ViT + eTT's task parameters; `forward(images) -> features (B, D)` (the backbone's pooling).

    Args:
        backbone: a timm ViT (frozen; never changed here).
        init_prefix: `(K, D)` attentive prototypes, one prefix token per class.
        generator: seeds `control_trans` (PyTorch's default Linear init, drawn from this generator).
    """

    def __init__(self, backbone: nn.Module, init_prefix: torch.Tensor, *, generator: torch.Generator | None = None):
        super().__init__()
        check_vit(backbone)
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        dim, depth = backbone.embed_dim, len(backbone.blocks)
        attn = backbone.blocks[0].attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        if self.heads * self.head_dim != dim:
            raise InvalidInput("the ett adapter needs attention width = embedding width (its prefixes are D-sized per block)")
        self.prefix_weight = nn.Parameter(init_prefix.detach().clone().float())
        hidden = dim // 2
        self.control_trans = nn.Sequential(_linear(dim, hidden, generator), nn.Tanh(), _linear(hidden, depth * 2 * dim, generator))
        self.offsets = nn.Parameter(torch.zeros(depth, 2, dim))  # DRA: (attention, MLP) offset per block
        self.backbone.eval()

    def train(self, mode: bool = True) -> ETTViT:
        super().train(mode)
        self.backbone.eval()
        return self

    def prefix_tokens(self) -> torch.Tensor:
        """`(depth, 2, heads, K, head_dim)`: key (0) and value (1) prefixes of every block and head."""
        k = self.prefix_weight.shape[0]
        depth = self.offsets.shape[0]
        out = self.control_trans(self.prefix_weight).view(k, depth, 2, self.heads, self.head_dim)
        return out.permute(1, 2, 3, 0, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prefix = self.prefix_tokens()
        x = embed(self.backbone, images)
        for i, blk in enumerate(self.backbone.blocks):
            x = run_block(blk, x, prefix[i], self.offsets[i])
        return self.backbone.forward_head(self.backbone.norm(x), pre_logits=True)

    def task_parameters(self) -> list[nn.Parameter]:
        return [self.prefix_weight, *self.control_trans.parameters(), self.offsets]


class PrefixTaskGraph(nn.Module):
    """The deployed task graph: the ViT with DRA folded into its biases and the prefix tokens as constants.

    Build it with `from_ett`; its forward equals `ETTViT.forward` (the re-exported ONNX graph is this module).
    """

    def __init__(self, backbone: nn.Module, prefix: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("prefix", prefix.detach().clone())

    @classmethod
    @torch.no_grad()
    def from_ett(cls, model: ETTViT) -> PrefixTaskGraph:
        import copy

        backbone = copy.deepcopy(model.backbone)
        backbone.load_state_dict(folded_state(model))
        return cls(backbone.eval(), model.prefix_tokens())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed(self.backbone, images)
        for i, blk in enumerate(self.backbone.blocks):
            x = run_block(blk, x, self.prefix[i])
        return self.backbone.forward_head(self.backbone.norm(x), pre_logits=True)


@torch.no_grad()
def folded_state(model: ETTViT) -> dict[str, torch.Tensor]:
    """The backbone's state dict with the DRA offsets added to `attn.proj.bias` and `mlp.fc2.bias` of each block."""
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    for i, blk in enumerate(model.backbone.blocks):
        for j, (key, lin) in enumerate((("attn.proj", blk.attn.proj), ("mlp.fc2", blk.mlp.fc2))):
            name = f"blocks.{i}.{key}.bias"
            base = state[name] if lin.bias is not None else torch.zeros(lin.out_features)
            state[name] = base + model.offsets[i, j]
    return state


class PrefixRegulariser(nn.Module):
    """eTT's `PR` loss on the prefix tokens: keeps them close to their attentive-prototype init.

    loss = mean_k CE(softmax((proj(n(p0_k)) - centre) / 0.04), softmax(proj(n(p_k)) / 0.1)), n = L2-normalise;
    the teacher side is detached and the centre moves towards the teacher's batch mean after each call.
    """

    def __init__(self, init_prefix: torch.Tensor, dim: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self.projector = _linear(dim, PR_DIM, generator)
        self.register_buffer("init_prefix", init_prefix.detach().clone().float())
        self.register_buffer("center", torch.zeros(1, PR_DIM))

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        student = self.projector(F.normalize(prefix, dim=-1)) / STUDENT_TEMP
        teacher = F.softmax((self.projector(F.normalize(self.init_prefix, dim=-1)) - self.center) / TEACHER_TEMP, dim=-1).detach()
        loss = torch.sum(-teacher * F.log_softmax(student, dim=-1), dim=-1).mean()
        with torch.no_grad():
            self.center.mul_(CENTER_MOMENTUM).add_(teacher.mean(0, keepdim=True) * (1 - CENTER_MOMENTUM))
        return loss


def _linear(fan_in: int, fan_out: int, generator: torch.Generator | None) -> nn.Linear:
    """nn.Linear with PyTorch's default init (uniform +-1/sqrt(fan_in), weight and bias) drawn from `generator`."""
    lin = nn.Linear(fan_in, fan_out)
    bound = fan_in ** -0.5
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=generator)
        lin.bias.uniform_(-bound, bound, generator=generator)
    return lin


@dataclass(frozen=True)
class EttCounts:
    """eTT's multiply-accumulates, counted once per (ViT, image size); the prefix count K (the task's ways) and
    the support size N enter only through the methods, so one count serves every task shape.

    Convention (as `fsdeploy.train.tsa.tsa_adapt_macs`): frozen Linears cost their forward MACs again in the
    backward (input gradients); a product of two activations (q.k^T, attention x values, prefixes included)
    costs 2x in the backward (both operands' gradients); a trained Linear costs 3x (forward, input and weight
    gradients); the patch projection has no backward (nothing before it trains).

    Attributes:
        patch: patch projection MACs per image.
        linears: every block Linear (qkv, proj, fc1, fc2) per image.
        attn: attention products (q.k^T and attention x values) per image without prefixes.
        attn_per_prefix: what one prefix token adds to `attn` per image (its key and value in every block).
        control: `control_trans` MACs per prefix token (Linear(D, D/2), Linear(D/2, depth x 2 x D)).
        align: vartheta's MACs per feature row (D x D').
        proj: the regulariser's projector MACs per prefix row (D x PR_DIM).
        stored: numbers a task stores whatever K: the DRA-folded `attn.proj`/`mlp.fc2` biases and vartheta.
        stored_per_prefix: numbers a task stores per prefix token: its key and value in every block.
    """

    patch: int
    linears: int
    attn: int
    attn_per_prefix: int
    control: int
    align: int
    proj: int
    stored: int
    stored_per_prefix: int

    @classmethod
    def of(cls, backbone: nn.Module, img_size: int) -> EttCounts:
        """Count a timm ViT at `img_size` (square) from its layer shapes.

        Raises:
            InvalidInput: not a plain timm ViT with a class token.
        """
        check_vit(backbone)
        dim, depth = int(backbone.embed_dim), len(backbone.blocks)
        grid_h, grid_w = backbone.patch_embed.dynamic_feat_size((img_size, img_size))
        patches = grid_h * grid_w
        tokens = patches + backbone.num_prefix_tokens
        linears = attn = per_prefix = 0
        for blk in backbone.blocks:
            linears += tokens * sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear))
            width = blk.attn.num_heads * blk.attn.head_dim
            attn += 2 * tokens * tokens * width
            per_prefix += 2 * tokens * width
        hidden = dim // 2
        return cls(patch=patches * backbone.patch_embed.proj.weight.numel(), linears=linears, attn=attn,
                   attn_per_prefix=per_prefix, control=dim * hidden + hidden * depth * 2 * dim,
                   align=dim * int(backbone.num_features), proj=dim * PR_DIM,
                   stored=depth * 2 * dim + dim * int(backbone.num_features), stored_per_prefix=depth * 2 * dim)

    def forward(self, n_prefix: int = 0) -> int:
        """One image through the ViT with `n_prefix` prefix tokens per block (vartheta not included)."""
        return self.patch + self.linears + self.attn + n_prefix * self.attn_per_prefix

    def fit(self, n_support: int, n_way: int, steps: int) -> int:
        """MACs of eTT's per-task fit (`fsdeploy.train.ett.fit_ett`), the support loss's cosine products left out.

        init: N forwards of the plain ViT (the attentive prototypes); per step: N x (prefix-ViT forward +
        backward), control_trans 3x on K rows, vartheta 3x on N rows, the projector forward on 2K rows
        (student and teacher) and its backward on the K student rows (2x).
        """
        n, k = int(n_support), int(n_way)
        attn = self.attn + k * self.attn_per_prefix
        step = n * (self.patch + 2 * self.linears + 3 * attn) + 3 * k * self.control + 3 * n * self.align + 4 * k * self.proj
        return n * self.forward(0) + int(steps) * step

    def params(self, n_way: int) -> int:
        """Numbers a task stores: the folded biases, vartheta and K prefix keys/values."""
        return self.stored + int(n_way) * self.stored_per_prefix
