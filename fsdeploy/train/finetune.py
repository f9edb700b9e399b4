"""Per-task fine-tuning of the backbone's own weights with a new linear classifier, on the support set, in PyTorch.

One loop serves three adapter kinds (`full-ft`, `partial-ft`, `maml`); they differ only in the recipe below.
The network stays in eval mode (dropout and drop-path off). BatchNorm follows each recipe's official code,
and each kind takes the other mode as its `bn` fit option (`adapt --bn`):

- `bn="frozen"`, full-ft and partial-ft: normalise with the pretrained running statistics, never updated.
  Chen et al.'s fine-tuning never runs the backbone in train mode: features are extracted once with
  `model.eval()` (CloserLookFewShot `save_features.py:120`) and only the linear layer trains on them
  (`methods/baselinefinetune.py:17-52`); TSA and BN-affine do the same (`fsdeploy.train.tsa`).
- `bn="batch"`, maml: every BatchNorm normalises with the statistics of the batch it sees, in the inner
  loop and on the queries: cbfinn/maml `utils.py:41` (`tf.contrib.layers.batch_norm`, `is_training` left at
  its default True), CloserLookFewShot `backbone.py:88-102` (`BatchNorm2d_fw`: `F.batch_norm(...,
  training=True)` on fresh zero/one buffers, so running statistics are neither used nor kept, whatever
  `model.eval()` says at test time, `test.py:143`). Deliberate difference, for a deployable graph that
  scores each query on its own (MAML's test-time query normalisation is transductive: it uses the query
  batch's statistics): the running statistics are updated at every step (PyTorch's train mode, momentum
  0.1) and the deployed graph normalises with them; they are task weights then. Not done: setting them to
  the support set's own statistics under the fitted weights. Tried: at 2-way 1-shot (32 px resnet18,
  1x1 maps in layer4) that z-scores each channel over 2 values, and the exported graph differed from the
  torch network by 0.45 on features of size 4.5 (the fold check refused it); the running average keeps
  some of the pretrained statistics and stays well conditioned.

Why it matters: the pretrained running statistics can hold channels with running variance ~0, which
eval-mode BatchNorm divides by sqrt(eps) = 0.003 (x316); a weight change feeding such a channel is amplified
as much, which is how MAML at lr 0.01 diverged with frozen BatchNorm (below). What trains are the parameters
(conv/linear weights, norm affine weights), so the fitted network has the plain graph with new values:
the "fold" is writing them into the state dict, and a task stores every trained tensor in full
(`TaskWeights.replaced`).

Recipes:

- ``chen`` (`full-ft`, `partial-ft`): the fine-tuning stage of the Baseline of Chen et al., "A Closer Look at
  Few-shot Classification", ICLR 2019 (official code wyharveychen/CloserLookFewShot,
  `methods/baselinefinetune.py`): a new `nn.Linear(D, K)` with PyTorch's default initialisation, SGD
  (lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3), cross-entropy, 100 epochs, each a fresh random
  permutation of the support set cut into batches of 4 (the last one smaller), no data augmentation.
  Deliberate difference, the point of the method here: the official code trains only the linear layer
  on frozen features; here the backbone's parameters are in the same optimiser with the same settings
  (full fine-tuning), or the layers and learning-rate multipliers of a partial fine-tuning spec.
  `steps` counts epochs (100 as published).
- ``olor`` (`full-ft-olor`): the same batches and epochs, optimised with OLOR as published
  (`fsdeploy.train.olor.OLORAdam`: Adam without weight decay, the backbone rolled back towards its
  pretrained weights with a ratio decaying linearly by layer from 0.01 to 0; the new head plain Adam) at
  OLOR's schedule (rainbow-xiao/OLOR-AAAI-2024, `OLOR/train.py`: init lr 1e-4, 5 warm-up epochs of 50, the
  factor rising linearly from 0.01 to 1, then 0.5 lr (1 + cos(π t / T)) over all T steps), here with the
  warm-up as the same 10% of the steps.
- ``maml`` (`maml`): MAML's inner loop (Finn, Abbeel, Levine, ICML 2017) run at test time: plain SGD,
  no momentum or weight decay, inner learning rate 0.01 (the paper's miniImageNet setting), each step
  on the whole support set, `steps` steps (10 at test time in the paper). There is no meta-trained
  initialisation here: the inner loop starts from the pretrained backbone and a zero-initialised head
  (so the first step moves only the head: with W = 0 no gradient reaches the backbone). First-order or
  not makes no difference at adaptation time (second-order terms only enter the outer, meta-training
  update), so this is also first-order MAML's and Reptile's inner loop. BatchNorm uses batch statistics,
  as MAML's; the deployed graph normalises with the running statistics those steps accumulated (above).

A fit whose support loss turns non-finite stops with InvalidInput naming the step. With frozen BatchNorm
it happens at the published rate 0.01 on the shipped 3-epoch efficientnet_b0 (measured, MAML: loss
1.6 -> 64 -> 1e36 by step 9; Chen's loop: by step 7 in some episodes), whose BatchNorm layers hold
channels with running variance 0, normalised by 1/sqrt(1e-5) in eval mode; with bn="batch" the same
MAML episode converges. Every kind takes an `lr` fit option to override the recipe's rate.

Randomness (head init and batch order) comes from `seed` only, so a fit is repeatable; on CPU it is
bit-identical.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from fsdeploy.errors import FitDiverged, InvalidInput
from fsdeploy.modules.fold import TaskWeights, task_weights
from fsdeploy.train.tsa import _device, _feature_dim, _freeze, _step_macs_per_image, _support


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe (module docstring).

    Attributes:
        optimizer: 'sgd' (torch.optim.SGD with the fields below) or 'olor' (`OLORAdam`).
        lr: base learning rate of the backbone and the head.
        momentum, dampening, weight_decay: SGD's (ignored by OLOR).
        batch: images per step, drawn as a random permutation per epoch, and `steps` counts epochs; None:
            the whole support set per step, and `steps` counts optimiser steps.
        head_init: 'default' (nn.Linear's own init) or 'zero'.
        cosine: cosine learning-rate schedule over all steps (OLOR's), else constant.
        warmup: fraction of the steps warmed up first (OLOR: 5 of 50 epochs), the factor linear from 0.01 to 1.
        bn: the recipe's BatchNorm mode when the caller gives none (`fit_finetune`'s `bn`).
    """

    name: str
    optimizer: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    batch: int | None = None
    head_init: str = "default"
    cosine: bool = False
    warmup: float = 0.0
    bn: str = "frozen"


CHEN = Recipe("chen", "sgd", 0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3, batch=4)
OLOR = Recipe("olor", "olor", 1e-4, batch=4, cosine=True, warmup=0.1)
MAML = Recipe("maml", "sgd", 0.01, head_init="zero", bn="batch")
RECIPES: dict[str, Recipe] = {r.name: r for r in (CHEN, OLOR, MAML)}
CHEN_EPOCHS = 100
BN_MODES = ("frozen", "batch")
MAML_TEST_STEPS = 10


@dataclass(frozen=True)
class FineTuneResult:
    """A fitted task: the network with new weights, the jointly trained linear head, the recipe.

    Attributes:
        model: the fine-tuned backbone (CPU, eval, every parameter frozen); same graph as the plain one.
        weight, bias: the linear head, logits = feats @ weight.T + bias; (K, D) and (K,).
        changed_keys: state-dict names of the trained backbone tensors (and, with bn='batch', every BatchNorm's
            running mean and variance).
        losses: support-batch loss of each optimiser step.
        recipe, lr, steps, batch, optimizer, device: what ran (steps as the caller gave them).
        multipliers: partial fine-tuning's learning-rate multiplier per unit (empty: every parameter at 1).
    """

    model: nn.Module
    weight: NDArray[np.float32]
    bias: NDArray[np.float32]
    changed_keys: tuple[str, ...]
    losses: tuple[float, ...]
    recipe: str
    lr: float
    steps: int
    batch: int | None
    optimizer: str
    device: str
    multipliers: dict[str, float] = field(default_factory=dict)
    bn: str = "frozen"

    def folded_state(self) -> dict[str, torch.Tensor]:
        """State dict for the plain graph (the trained tensors replaced)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def task_weights(self) -> TaskWeights:
        """The per-task artefact: every trained tensor in full."""
        return task_weights(self.model, replaced_keys=self.changed_keys)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The head on features (N, D), in torch."""
        return feats @ torch.from_numpy(self.weight).T + torch.from_numpy(self.bias)


def trained_linear(weight: np.ndarray, bias: np.ndarray) -> Any:
    """A `TaskModel` (no transform, `linear` head) holding an already trained classifier.

    Its `fit` only checks the features against the weights: the head was trained with the backbone, so
    refitting it on the folded graph's features would discard that. Saved state is a plain `linear` head.
    """
    from fsdeploy.heads.linear import LinearHead
    from fsdeploy.heads.pipeline import TaskModel
    from fsdeploy.heads.transforms import make_transform

    class _Trained(LinearHead):
        def fit(self, feats: Any, labels: Any, rng: Any = None) -> LinearHead:
            feats = np.asarray(feats)
            k = int(np.max(labels)) + 1
            if feats.ndim != 2 or feats.shape[1] != weight.shape[1] or k != weight.shape[0]:
                raise InvalidInput(f"the fine-tuned head is ({weight.shape[0]}, {weight.shape[1]}); got features "
                                   f"{feats.shape} with {k} classes")
            return self

    head = _Trained()
    head.weight_ = np.ascontiguousarray(weight, dtype=np.float32)
    head.bias_ = np.ascontiguousarray(bias, dtype=np.float32)
    return TaskModel(make_transform("none"), head)


def batch_schedule(n: int, steps: int, recipe: Recipe, generator: torch.Generator) -> list[torch.Tensor]:
    """Support indices of every optimiser step: per epoch a random permutation in batches of `recipe.batch`
    (Chen et al.'s loop), or the whole support set per step."""
    if recipe.batch is None:
        return [torch.arange(n) for _ in range(int(steps))]
    out = []
    for _ in range(int(steps)):  # a batched recipe counts epochs
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i:i + recipe.batch] for i in range(0, n, recipe.batch))
    return out


def schedule_factor(t: int, total: int, warmup: float) -> float:
    """OLOR's learning-rate factor at step t of `total`: linear warm-up from 0.01 over the first `warmup`
    fraction of the steps, then 0.5 (1 + cos(π t / total))."""
    w = warmup * total
    if t < w:
        a = t / w
        return min(0.01 * (1 - a) + a, 1.0)
    return 0.5 * (1 + math.cos(math.pi * t / total))


def make_head(dim: int, n_classes: int, init: str, generator_seed: int) -> nn.Linear:
    """The new linear classifier: nn.Linear's default init under a fixed seed, or zeros."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        head = nn.Linear(dim, n_classes)
    if init == "zero":
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
    return head


def trained_parameters(model: nn.Module, multipliers: Mapping[str, float] | None) -> list[tuple[str, nn.Parameter, float]]:
    """(name, parameter, lr multiplier) of every tensor that trains, in parameter order (shallow first).

    `multipliers` maps module-name prefixes (units, `fsdeploy.train.partial_search.units_of`) to their
    multiplier; a parameter under no listed prefix, or under one with multiplier 0, stays frozen. None:
    every parameter at multiplier 1 (full fine-tuning).
    """
    out = []
    for name, p in model.named_parameters():
        if multipliers is None:
            out.append((name, p, 1.0))
            continue
        unit = next((u for u in multipliers if name == u or name.startswith(u + ".")), None)
        if unit is not None and multipliers[unit] > 0:
            out.append((name, p, float(multipliers[unit])))
    return out


def fit_finetune(
    backbone: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    steps: int,
    recipe: str | Recipe = "chen",
    multipliers: Mapping[str, float] | None = None,
    lr: float | None = None,
    bn: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> FineTuneResult:
    """Fine-tune a copy of `backbone` and a new linear head on one support set.

    Args:
        backbone: plain timm backbone returning pooled features (N, D); left unchanged.
        images, labels: the support set (as `fsdeploy.train.tsa.fit_tsa`).
        steps: epochs (chen, olor) or optimiser steps (maml).
        recipe: a `RECIPES` name or a `Recipe`.
        multipliers: partial fine-tuning: unit prefix -> learning-rate multiplier (see `trained_parameters`);
            None trains every parameter. The head always trains at the base rate.
        lr: overrides the recipe's base learning rate.
        bn: 'frozen' (eval-mode BatchNorm, running statistics kept) or 'batch' (BatchNorm normalises with each
            batch's statistics while fitting and updates its running statistics, PyTorch's train mode; the new
            running statistics are task weights too); None: the recipe's (maml: batch, the others: frozen).
            A step on a single image (the last batch of 4 of an odd support set) uses the running statistics.
        seed: head init and batch order.

    Raises:
        InvalidInput: bad inputs, an unknown recipe, or negative steps.
    """
    rec = _recipe(recipe)
    if steps < 0:
        raise InvalidInput(f"--steps must be >= 0, got {steps}")
    base_lr = rec.lr if lr is None else float(lr)
    dev = _device(device)
    x, y, n_classes = _support(images, labels, dev)
    bn = rec.bn if bn is None else bn
    if bn not in BN_MODES:
        raise InvalidInput(f"unknown --bn {bn!r}; choose one of {', '.join(BN_MODES)}")
    model = copy.deepcopy(backbone).to(dev).eval()
    _freeze(model.parameters())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if bn == "batch":
        for m in norms:
            m.train()
    trained = trained_parameters(model, multipliers)
    for _, p, _ in trained:
        p.requires_grad_(True)
    head = make_head(_feature_dim(backbone), n_classes, rec.head_init, seed).to(dev)
    opt = _optimiser(rec, trained, list(head.parameters()), base_lr)
    gen = torch.Generator().manual_seed(int(seed))
    schedule = batch_schedule(len(x), steps, rec, gen)
    initial = [g["lr"] for g in opt.param_groups]
    losses = []
    for t, idx in enumerate(schedule):
        if rec.cosine:
            for g, lr0 in zip(opt.param_groups, initial):
                g["lr"] = lr0 * schedule_factor(t, len(schedule), rec.warmup)
        opt.zero_grad(set_to_none=True)
        idx = idx.to(dev)
        single = bn == "batch" and len(idx) == 1  # one image has no batch statistics: that step uses the running ones
        for m in norms if single else ():
            m.eval()
        loss = F.cross_entropy(head(model(x[idx])), y[idx])
        for m in norms if single else ():
            m.train()
        if not torch.isfinite(loss):
            raise FitDiverged(
                f"{rec.name} fine-tuning diverged at step {t + 1} of {len(schedule)} (support loss {float(loss.detach())}): learning "
                f"rate {base_lr:g} is too high for this backbone (e.g. BatchNorm channels with running variance ~0 scale "
                "weight changes by up to 1/sqrt(eps)); pass a lower lr fit option")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.cpu().eval()
    _freeze(model.parameters())
    for m, original in zip(norms, (m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   and m.track_running_stats)):
        if m.num_batches_tracked is not None:  # a counter eval mode never reads: keep the plain value, not a task weight
            m.num_batches_tracked.copy_(original.num_batches_tracked)
    stats = tuple(f"{n}.{b}" for n, m in model.named_modules() if m in norms for b in ("running_mean", "running_var")) \
        if bn == "batch" else ()
    w = head.weight.detach().cpu().numpy().astype(np.float32, copy=True)
    b = head.bias.detach().cpu().numpy().astype(np.float32, copy=True)
    mults = {} if multipliers is None else {k: float(v) for k, v in multipliers.items()}
    return FineTuneResult(model, w, b, tuple(n for n, _, _ in trained) + stats, tuple(losses), rec.name, base_lr, int(steps),
                          rec.batch, rec.optimizer, dev.type, mults, bn)


def finetune_adapt_macs(backbone: nn.Module, img_size: int | tuple[int, int], n_support: int, steps: int,
                        recipe: str | Recipe = "chen", multipliers: Mapping[str, float] | None = None) -> int:
    """Multiply-accumulates of `fit_finetune` in the backbone: images processed x (forward + backward) per image.

    Images processed: `steps` x n_support for every recipe (an epoch of batches of 4 passes each support
    image once; a MAML step passes the whole set). Per image, by forward hooks on every Conv2d/Linear
    (`fsdeploy.train.tsa.tsa_adapt_macs`' convention): forward m, + m for the input gradient where the
    layer's input requires grad, + m for the weight gradient where its weight trains. The linear
    classifier (3 x D x K per image: forward, weight and input gradient) is left out because it depends on
    K; the cost table adds it (`head_macs`).
    """
    _recipe(recipe)  # every recipe passes each support image once per step (maml) or epoch (chen, olor)
    model = copy.deepcopy(backbone).eval()
    _freeze(model.parameters())
    for _, p, _ in trained_parameters(model, multipliers):
        p.requires_grad_(True)
    return int(steps) * int(n_support) * _step_macs_per_image(model, [model], model, img_size)


def _recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise InvalidInput(f"unknown fine-tuning recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _optimiser(rec: Recipe, trained: Sequence[tuple[str, nn.Parameter, float]], head: list[nn.Parameter],
               lr: float) -> torch.optim.Optimizer:
    if rec.optimizer == "olor":
        from fsdeploy.train.olor import OLORAdam

        if any(m != 1.0 for _, _, m in trained):
            raise InvalidInput("OLOR runs with one learning rate; drop the layer multipliers or use the chen recipe")
        return OLORAdam([p for _, p, _ in trained], head, lr=lr)
    groups: dict[float, list[nn.Parameter]] = {}
    for _, p, m in trained:
        groups.setdefault(m, []).append(p)
    param_groups = [{"params": ps, "lr": lr * m} for m, ps in groups.items()] + [{"params": head, "lr": lr}]
    return torch.optim.SGD(param_groups, lr=lr, momentum=rec.momentum, dampening=rec.dampening,
                           weight_decay=rec.weight_decay)
