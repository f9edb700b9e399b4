"""Fit eTT on one task's support set (the official test-time tuning, `pa_prefix.py:74-139` of chmxu/eTT_TMLR2022).

Per task: attentive prototypes initialise one prefix token per class; then `steps` AdamW steps (eps 1e-4,
PyTorch's default weight decay 0.01, `pa_prefix.py:109`) on

    loss = CE(10 * cos(vartheta f(x), class means of vartheta f(support))) on the support set itself
           + 0.1 * PR(prefix)                                   (pa_prefix.py:119-124, lam = 0.1 at :82)

with learning rates lr for the pre-classifier map vartheta (identity init, `pa_prefix.py:91`) and lr / 2 for
the DRA offsets, `control_trans`, the prefix tokens and the regulariser's projector (`pa_prefix.py:101-108`).
The official default is 40 steps (`test_extractor_pa_vit_prefix.py:100`) with lr 1e-3 on most Meta-Dataset
domains (5e-4 on ImageNet, birds, fungi, COCO, Omniglot; 5e-3 on traffic signs, `:77-84`).

The result's `task_graph()` is the deployed module (DRA folded into the biases, prefixes as constants) and
vartheta becomes the stored head's alignment (cosine NCC on vartheta-mapped features), as for TSA's beta.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from fsdeploy.modules.ett import (
    PREFIX_KEY, ETTViT, EttCounts, PrefixRegulariser, PrefixTaskGraph, attentive_prototypes, check_vit, folded_state,
)
from fsdeploy.modules.fold import TaskWeights
from fsdeploy.train.tsa import _device, _support, ncc_cosine_loss

ETT_LR = 1e-3
ETT_STEPS = 40
PR_WEIGHT = 0.1
ADAMW_EPS = 1e-4


@dataclass(frozen=True)
class ETTResult:
    """A fitted eTT task.

    Attributes:
        model: the ETTViT (CPU, eval, frozen): images -> unaligned features (N, D).
        beta: (D, D) fitted vartheta; aligned features = feats @ beta.T.
        losses: total loss before each step.
    """

    model: ETTViT
    beta: NDArray[np.float32]
    losses: tuple[float, ...]
    lr: float
    steps: int
    device: str

    adapt_macs: int = 0

    def task_graph(self) -> PrefixTaskGraph:
        """The module the task exports: DRA folded into biases, prefix keys/values as constants."""
        return PrefixTaskGraph.from_ett(self.model).eval()

    def export_module(self) -> nn.Module:
        """What `adapters.folded.fit_folded` re-exports (the plain graph cannot hold the prefixes)."""
        return self.task_graph()

    def folded_state(self) -> dict[str, torch.Tensor]:
        """The plain ViT's state dict with the DRA offsets folded into `attn.proj` / `mlp.fc2` biases."""
        return folded_state(self.model)

    def task_weights(self) -> TaskWeights:
        """The DRA-folded biases ("set/...") and vartheta ("beta"); the prefixes are in `extra_arrays`."""
        state = folded_state(self.model)
        keys = [k for k in state if k.endswith((".attn.proj.bias", ".mlp.fc2.bias"))]
        return TaskWeights({}, {k: state[k].float().numpy().copy() for k in keys}, self.beta.copy())

    def extra_arrays(self) -> dict[str, np.ndarray]:
        """Task-state arrays beyond TaskWeights: the prefix keys/values `(depth, 2, heads, K, head_dim)`."""
        with torch.no_grad():
            return {PREFIX_KEY: self.model.prefix_tokens().float().numpy().copy()}


def ett_optimiser(model: ETTViT, vartheta: nn.Parameter, reg: PrefixRegulariser, lr: float) -> torch.optim.Optimizer:
    """AdamW with the official parameter groups: vartheta at lr, everything else at lr / 2."""
    return torch.optim.AdamW([
        {"params": [vartheta], "lr": lr},
        {"params": [model.offsets], "lr": lr / 2},
        {"params": list(model.control_trans.parameters()), "lr": lr / 2},
        {"params": [model.prefix_weight], "lr": lr / 2},
        {"params": list(reg.parameters()), "lr": lr / 2},
    ], eps=ADAMW_EPS)


def ett_loss(model: ETTViT, vartheta: torch.Tensor, reg: PrefixRegulariser, images: torch.Tensor,
             labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Support NCC loss on vartheta-mapped features + 0.1 x the prefix regulariser (updates its centre)."""
    feats = F.linear(model(images), vartheta)
    return ncc_cosine_loss(feats, labels, n_way) + PR_WEIGHT * reg(model.prefix_weight)


def fit_ett(backbone: nn.Module, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, *,
            steps: int = ETT_STEPS, lr: float = ETT_LR, seed: int = 0, device: str | None = None) -> ETTResult:
    """Fit eTT's prefixes, DRA offsets and vartheta on the support set; the backbone is not modified.

    Raises:
        InvalidInput: not a plain timm ViT with a class token; bad support images/labels.
    """
    check_vit(backbone)
    dev = _device(device)
    x, y, n_way = _support(images, labels, dev)
    import copy

    bb = copy.deepcopy(backbone).to(dev).eval()
    gen = torch.Generator().manual_seed(int(seed))
    init = attentive_prototypes(bb, x, y, n_way)
    model = ETTViT(bb, init.cpu(), generator=gen).to(dev)
    reg = PrefixRegulariser(init.cpu(), bb.embed_dim, generator=gen).to(dev)
    vartheta = nn.Parameter(torch.eye(bb.num_features, device=dev))
    opt = ett_optimiser(model, vartheta, reg, lr)
    losses = []
    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss = ett_loss(model, vartheta, reg, x, y, n_way)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model = model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    macs = ett_adapt_macs(backbone, int(x.shape[-1]), int(x.shape[0]), n_way, steps)
    return ETTResult(model, vartheta.detach().cpu().numpy().astype(np.float32), tuple(losses), float(lr), int(steps), dev.type,
                     macs)


def ett_adapt_macs(backbone: nn.Module, img_size: int, n_support: int, n_way: int, steps: int = ETT_STEPS) -> int:
    """Multiply-accumulates to adapt one task (the support-set loss's own cosine products left out);
    the count and its convention: `fsdeploy.modules.ett.EttCounts.fit`."""
    return EttCounts.of(backbone, img_size).fit(n_support, n_way, steps)
