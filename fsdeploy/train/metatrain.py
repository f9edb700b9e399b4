"""Meta-train the CaSE blocks of a frozen backbone on few-shot episodes, UpperCaSE style.

Patacchiola, Bronskill, Shysheya, Hofmann, Nowozin, Turner, "Contextual Squeeze-and-Excitation for Efficient
Few-Shot Image Classification", NeurIPS 2022 (arXiv 2206.09843).

Per task: the context pass gives context features and γ; a zero-initialised linear head is fitted on the
detached context features (the UpperCaSE head: Adam β 0.9/0.999, ε 1e-8, weight decay 1e-5, 500 steps of
128 rows drawn with replacement, lr linear 1e-3 → 1e-5, mean cross-entropy). Then, with that head frozen,
the CaSE parameters (only they) get gradients. Two outer steps:

- `upstream` (default; the official `models/uppercase.py`, `UpperCaSE.learn`): max(1, (N + M) // 128)
  batches of 128 images drawn with replacement from context ∪ target, each run in adaptive mode (γ
  recomputed from that batch itself), each mean cross-entropy `backward()`-ed at once. Gradients are
  summed, not averaged, over batches and tasks; Adam steps after task t when t % 16 == 0 and t > 0 (so
  the first step carries 17 tasks, and tasks after the last multiple of 16 never step), at lr
  linspace(1e-3, 1e-5, tasks)[t].
- `context-gamma` (fsdeploy's earlier step, kept for comparison): γ from the context set only, target
  images in query mode under that γ, one mean cross-entropy over context + target per task, gradients
  averaged over each group of 16 tasks, a step after every group (a short last group too).

The backbone never changes: its weights are frozen and BatchNorm stays in eval mode. Meta-training from
scratch starts the CaSE blocks as the official code does (`CaseBlock.reset_for_metatraining_`, drawn
from `seed`); a checkpoint that already holds CaSE blocks continues from them.

The checkpoint is the backbone's own state dict plus the CaSE blocks under `cases.`, with metadata naming
the model, its preprocessing and the CaSE sites; `fsdeploy export MODEL --adapter case --checkpoint` reads it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsdeploy.backbones import read_checkpoint, save_checkpoint
from fsdeploy.data.cache import ImageCache
from fsdeploy.data.episodes import sample_episode
from fsdeploy.data.folders import scan_image_folder, split_classes
from fsdeploy.errors import InvalidInput
from fsdeploy.backbones import BuildRequest
from fsdeploy.modules.case_checkpoint import CASE_PREFIX, build_casenet, case_checkpoint_state
from fsdeploy.modules.casenet import CaseNet


OUTER_STEPS = ("upstream", "context-gamma")
OUTER_BATCH = 128  # images per adaptive-mode batch of the upstream outer step


@dataclass(frozen=True)
class TaskStats:
    """One meta-training task: its loss and the frozen head's accuracy on its target images."""

    task: int
    tasks: int
    loss: float
    target_acc: float
    lr: float
    stepped: bool  # an optimiser step happened after this task

    # target_acc: `context-gamma` scores every target image in query mode under the context γ; `upstream`
    # scores the target rows of its drawn batches in adaptive mode (no extra forward pass).


@dataclass(frozen=True)
class HeadRecipe:
    """The UpperCaSE linear head's optimisation (defaults are the paper's)."""

    iters: int = 500
    batch: int = 128
    lr_start: float = 1e-3
    lr_end: float = 1e-5
    weight_decay: float = 1e-5


def fit_head_torch(
    feats: torch.Tensor, labels: torch.Tensor, ways: int, rng: np.random.Generator, recipe: HeadRecipe = HeadRecipe()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the zero-init linear head on fixed features `(N, D)`; returns weight `(ways, D)` and bias `(ways,)`.

    The same steps as `torch.optim.Adam` (L2 weight decay on weight and bias) on the mean cross-entropy of
    each drawn batch, written out without autograd: the softmax-CE gradient is closed-form, and when the
    context set is smaller than a batch each step runs on the N distinct rows weighted by how often they
    were drawn, which is the same gradient. Rows are drawn as `rng.integers(0, N, (iters, batch))`, the
    draw fsdeploy's numpy `LinearHead` makes, so both fit the same head from the same generator state.
    """
    x = torch.cat([feats.detach(), torch.ones(feats.shape[0], 1, device=feats.device, dtype=feats.dtype)], 1)
    n, k = x.shape[0], int(ways)
    onehot = F.one_hot(labels, k).to(x.dtype)
    rows = torch.from_numpy(rng.integers(0, n, size=(recipe.iters, recipe.batch))).to(x.device)
    weighted = n < recipe.batch
    if weighted:  # (iters, N) share of each distinct row in each batch
        share = torch.zeros(recipe.iters, n, device=x.device, dtype=x.dtype)
        share.scatter_add_(1, rows, torch.full(rows.shape, 1.0 / recipe.batch, device=x.device, dtype=x.dtype))
    theta = torch.zeros(k, x.shape[1], device=x.device, dtype=x.dtype)  # [weight | bias]
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    b1, b2, eps = 0.9, 0.999, 1e-8
    lrs = np.linspace(recipe.lr_start, recipe.lr_end, recipe.iters)
    with torch.no_grad():
        for t in range(recipe.iters):
            if weighted:
                xb, yb, wb = x, onehot, share[t].unsqueeze(1)
            else:
                xb, yb = x[rows[t]], onehot[rows[t]]
                wb = torch.full((recipe.batch, 1), 1.0 / recipe.batch, device=x.device, dtype=x.dtype)
            err = (torch.softmax(xb @ theta.T, 1) - yb) * wb
            grad = err.T @ xb + recipe.weight_decay * theta
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step = float(lrs[t]) / (1 - b1 ** (t + 1))
            theta.addcdiv_(m, (v / (1 - b2 ** (t + 1))).sqrt_().add_(eps), value=-step)
    return theta[:, :-1].contiguous(), theta[:, -1].contiguous()


def episode_classes(data_dir: Path, split: str | None) -> list[str] | None:
    """Class folders of `split` from `data_dir/splits.json`, or None (all classes) when there is no split file.

    Raises:
        InvalidInput: a split was asked for that the split file does not have.
    """
    return None if split is None else split_classes(data_dir, split)


def _on(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(arr).to(dev)


def task_loss(
    net: CaseNet, context: torch.Tensor, context_y: torch.Tensor, target: torch.Tensor, target_y: torch.Tensor,
    ways: int, rng: np.random.Generator, recipe: HeadRecipe,
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the frozen per-task head on context + target images; gradients reach only CaSE."""
    ctx_feats, gamma = net.context_module()(context)
    weight, bias = fit_head_torch(ctx_feats, context_y, ways, rng, recipe)
    tgt_feats = net.query_module()(target, gamma)
    logits = torch.cat([ctx_feats, tgt_feats]) @ weight.T + bias
    loss = F.cross_entropy(logits, torch.cat([context_y, target_y]))
    acc = float((logits[len(context_y):].argmax(1) == target_y).float().mean())
    return loss, acc


def upstream_task_backward(
    net: CaseNet, context: torch.Tensor, context_y: torch.Tensor, target: torch.Tensor, target_y: torch.Tensor,
    ways: int, rng: np.random.Generator, recipe: HeadRecipe, batch: int = OUTER_BATCH,
) -> tuple[float, float]:
    """The official outer step for one task: head on the context pass, then adaptive-mode batches, each backward.

    Random draws, in order: the head's batches (`fit_head_torch`), then one `rng.integers(0, N + M, batch)`
    per outer batch. Gradients accumulate in the CaSE parameters' `.grad` (summed); nothing steps here.

    Returns:
        mean loss over the batches, accuracy of the frozen head on the drawn target rows (nan if none).
    """
    with torch.no_grad():
        ctx_feats, _ = net.context_module()(context)
    weight, bias = fit_head_torch(ctx_feats, context_y, ways, rng, recipe)
    images, labels = torch.cat([context, target]), torch.cat([context_y, target_y])
    n, n_ctx = images.shape[0], context.shape[0]
    losses, hits, seen = [], 0, 0
    for _ in range(max(1, n // batch)):
        rows = torch.from_numpy(rng.integers(0, n, size=batch)).to(images.device)
        feats, _ = net.context_module()(images[rows])  # adaptive mode: γ from this batch itself
        logits = feats @ weight.T + bias
        loss = F.cross_entropy(logits, labels[rows])
        loss.backward()
        losses.append(float(loss.detach()))
        is_target = rows >= n_ctx
        hits += int((logits.detach().argmax(1) == labels[rows])[is_target].sum())
        seen += int(is_target.sum())
    return sum(losses) / len(losses), (hits / seen if seen else float("nan"))


def _starts_from_scratch(checkpoint: str | Path | None) -> bool:
    """True unless `checkpoint` already holds CaSE blocks (a metatrain checkpoint to continue)."""
    if checkpoint is None:
        return True
    state, _ = read_checkpoint(checkpoint)
    return not any(k.startswith(CASE_PREFIX) for k in state)


def metatrain(
    model: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    split: str | None = "base",
    img_size: int | None = None,
    tasks: int = 1000,
    ways: int = 5,
    shots: int = 5,
    queries: int = 10,
    lr: float = 1e-3,
    lr_end: float = 1e-5,
    accumulate: int = 16,
    outer: str = "upstream",
    head: HeadRecipe = HeadRecipe(),
    device: str | None = None,
    seed: int = 0,
    progress: Callable[[TaskStats], None] | None = None,
) -> Path:
    """Meta-train the CaSE blocks of `model` on episodes from the ImageFolder `data_dir`; returns `out`.

    Args:
        model: timm name (a family with a CaSE placement rule: efficientnet, resnet).
        data_dir: one sub-folder of images per class; with `splits.json`, only `split`'s classes are used.
        out: checkpoint to write (`.safetensors`), atomically.
        checkpoint: backbone weights (or a previous metatrain checkpoint, to continue from its CaSE blocks).
        tasks: episodes; `ways`-way `shots`-shot with `queries` target images per class.
        lr, lr_end: Adam learning rate at the first and last task (linear in between).
        accumulate: tasks per optimiser step (16; `upstream` steps after task t when t % accumulate == 0 and
            t > 0 with summed gradients, `context-gamma` after every group with averaged ones).
        outer: 'upstream' (the official outer step) or 'context-gamma' (see the module docstring).
        head: the per-task head recipe (fewer `iters` for quick runs).
        device: torch device; default CUDA when available, else CPU.
        seed: seeds episode draws, head and outer batch draws, and the from-scratch CaSE init.

    Raises:
        InvalidInput: bad counts, too few classes for `ways`, or an output path not ending in .safetensors.
    """
    out, data_dir = Path(out), Path(data_dir)
    if out.suffix != ".safetensors":
        raise InvalidInput(f"metatrain output {out} must end in .safetensors")
    if min(tasks, ways, shots, queries, accumulate) < 1:
        raise InvalidInput("tasks, ways, shots, queries and accumulate must all be >= 1")
    if outer not in OUTER_STEPS:
        raise InvalidInput(f"unknown outer step {outer!r}; choose one of {', '.join(OUTER_STEPS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, pre = build_casenet(BuildRequest(model, Path(checkpoint) if checkpoint else None, pretrained, img_size))
    net = net.to(dev).eval()  # eval for good: BatchNorm statistics and dropout stay frozen
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    fresh = _starts_from_scratch(checkpoint)
    if fresh:
        init_rng = torch.Generator().manual_seed(int(seed))
        for block in net.cases:
            block.reset_for_metatraining_(init_rng)
    params = list(net.cases.parameters())
    for p in params:
        p.requires_grad_(True)
    files = scan_image_folder(data_dir, classes=episode_classes(data_dir, split))
    images = ImageCache(files.paths, pre)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(params, lr=lr)
    opt.zero_grad(set_to_none=True)
    pending = 0
    lrs = np.linspace(lr, lr_end, tasks)
    for t in range(tasks):
        ep = sample_episode(files.labels, ways, shots, queries, rng)
        batch = (
            _on(images.get(ep.support), dev), _on(ep.support_labels, dev), _on(images.get(ep.query), dev),
            _on(ep.query_labels, dev),
        )
        task_lr = float(lrs[t])
        if outer == "upstream":
            loss_value, acc = upstream_task_backward(net, *batch, ways, rng, head)
            _check_finite(loss_value, t)
            stepped = t % accumulate == 0 and t > 0
            if stepped:
                for group in opt.param_groups:
                    group["lr"] = task_lr
                opt.step()
                opt.zero_grad(set_to_none=True)
            if progress is not None:
                progress(TaskStats(t + 1, tasks, loss_value, acc, task_lr, stepped))
            continue
        loss, acc = task_loss(net, *batch, ways, rng, head)
        loss_value = float(loss.detach())
        _check_finite(loss_value, t)
        (loss / accumulate).backward()
        pending += 1
        stepped = pending == accumulate or t == tasks - 1
        if stepped:
            if pending < accumulate:  # a short last group: average over the tasks it really has
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(accumulate / pending)
            for group in opt.param_groups:
                group["lr"] = task_lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            pending = 0
        if progress is not None:
            progress(TaskStats(t + 1, tasks, loss_value, acc, task_lr, stepped))
    net = net.cpu()
    save_checkpoint(
        case_checkpoint_state(net), out, name=model, preprocess=pre,
        extra={
            "adapter": "case",
            "case_sites": [s.name for s in net.layout],
            "metatrain": {
                "data": str(data_dir), "split": split, "tasks": tasks, "ways": ways, "shots": shots, "queries": queries,
                "lr": lr, "lr_end": lr_end, "accumulate": accumulate, "outer": outer,
                "init": "upstream" if fresh else "checkpoint", "head_iters": head.iters, "seed": seed,
                "backbone_checkpoint": str(checkpoint) if checkpoint else None,
            },
        },
    )
    return out


def _check_finite(loss_value: float, t: int) -> None:
    if not math.isfinite(loss_value):
        raise InvalidInput(f"meta-training diverged at task {t + 1} (loss {loss_value}); lower --lr")
