"""Per-task fitting of TSA adapters (alpha + beta) and of BN-affine, on the support set, in PyTorch.

TSA: Li, Liu, Bilen, "Cross-domain Few-shot Learning with Task-specific Adapters", CVPR 2022. Recipe as in
the released code (VICO-UoE/URL, `models/tsa.py`, `test_extractor_tsa.py`): backbone frozen and in eval mode
(BatchNorm uses its running statistics), alpha reset to 1e-4 x identity and beta to identity per task, loss =
cross-entropy of 10 x cosine(beta f(x), class prototypes of beta f(support)) on the support set itself (full
batch), Adadelta (rho 0.9, eps 1e-6), 40 steps. Learning rates there: alpha 0.5 / beta 1.0 on domains the
backbone was not trained on, alpha 0.05 / beta 0.1 on its training domains. fsdeploy defaults to "unseen":
a user's own images are not the backbone's training data, and on seen domains the small rates mostly
protect features that are already good. Pass `lr_alpha, lr_beta = TSA_LEARNING_RATES["seen"]` otherwise.

BN-affine: the same loss, optimiser and step count, training only every BatchNorm's weight and bias
(running statistics frozen, eval mode), no beta. Its learning rate 0.5 is our choice (no published
recipe for this exact setting): the TSA alpha rate, since Adadelta's steps start near lr x 1e-3 and
both parameter sets are per-channel scales on unit-scale activations. `optimizer="olor"` instead runs OLOR as
published (`fsdeploy.train.olor`: Adam, no weight decay, each step rolls the BN weights back towards the
pretrained ones with λ = η·b_i decaying linearly from 0.01 on the first BN tensor to 0 on the last), at
Adam lr 1e-3 (our choice, constant over the 40 steps; OLOR's own runs use 1e-4 with a cosine schedule
over whole epochs).

Fitting is deterministic (full batch, fixed initialisation, no dropout in eval mode), so it takes no seed;
on CPU repeated runs are bit-identical, on CUDA up to cuDNN's nondeterministic kernels.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from fsdeploy.errors import InvalidInput
from fsdeploy.modules.adapters import adapters_of, alignment_map, with_adapters
from fsdeploy.modules.fold import TaskWeights, folded_state, task_weights

TSA_LEARNING_RATES: dict[str, tuple[float, float]] = {"unseen": (0.5, 1.0), "seen": (0.05, 0.1)}  # (alpha, beta)
BN_AFFINE_LR = 0.5
BN_AFFINE_OLOR_LR = 1e-3
BN_AFFINE_OPTIMIZERS = ("adadelta", "olor")
ADAPT_STEPS = 40
COSINE_SCALE = 10.0
ADADELTA = {"rho": 0.9, "eps": 1e-6}


@dataclass(frozen=True)
class TSAResult:
    """A fitted TSA task.

    Attributes:
        model: the adapter network (CPU, eval, every parameter frozen): images -> unaligned features (N, D).
        beta: (D, D) fitted alignment; aligned features = feats @ beta.T.
        losses: support loss before each step (len == steps).
        lr_alpha, lr_beta, steps: the recipe used.
        device: where fitting ran ("cpu" or "cuda").
    """

    model: nn.Module
    beta: NDArray[np.float32]
    losses: tuple[float, ...]
    lr_alpha: float
    lr_beta: float
    steps: int
    device: str

    def folded_state(self) -> dict[str, torch.Tensor]:
        """State dict of the plain backbone with alpha folded in (loads strictly into a fresh timm model)."""
        return folded_state(self.model)

    def task_weights(self) -> TaskWeights:
        """The per-task artefact: alpha as centre-tap deltas and beta."""
        return task_weights(self.model, beta=self.beta)


@dataclass(frozen=True)
class BNAffineResult:
    """A fitted BN-affine task.

    Attributes:
        model: the backbone with fitted BN weight/bias (CPU, eval, frozen); same graph as the plain one.
        changed_keys: the state-dict names fitted ("...bn1.weight", "...bn1.bias", ...).
        losses: support loss before each step.
        lr, steps, device: the recipe used.
    """

    model: nn.Module
    changed_keys: tuple[str, ...]
    losses: tuple[float, ...]
    lr: float
    steps: int
    device: str
    optimizer: str = "adadelta"

    def folded_state(self) -> dict[str, torch.Tensor]:
        """State dict for the plain graph (BN weight/bias replaced)."""
        return folded_state(self.model)

    def task_weights(self) -> TaskWeights:
        """The per-task artefact: the fitted BN weights and biases."""
        return task_weights(self.model, replaced_keys=self.changed_keys)


def ncc_cosine_loss(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, *, scale: float = COSINE_SCALE) -> torch.Tensor:
    """Mean cross-entropy of scale x cos(feats, class means of feats): URL/TSA's NCC loss on the support set.

    Args:
        feats: (N, D) features; labels: (N,) class indices 0..n_classes-1, each class present.
    """
    counts = torch.bincount(labels, minlength=n_classes).to(feats.dtype)
    protos = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add(0, labels, feats)
    protos = protos / counts[:, None]
    logits = scale * F.normalize(feats, dim=1, eps=1e-30) @ F.normalize(protos, dim=1, eps=1e-30).T
    return F.cross_entropy(logits, labels)


def fit_tsa(
    backbone: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    steps: int = ADAPT_STEPS,
    lr_alpha: float = TSA_LEARNING_RATES["unseen"][0],
    lr_beta: float = TSA_LEARNING_RATES["unseen"][1],
    device: str | torch.device | None = None,
) -> TSAResult:
    """Fit TSA's residual adapters alpha and alignment beta jointly on one task's support set.

    Args:
        backbone: plain frozen timm backbone returning pooled features (N, D); left unchanged.
        images: preprocessed support images (N, C, H, W), float.
        labels: (N,) class labels (any integers; mapped to 0..K-1 in sorted order), at least 2 classes.
        steps: Adadelta steps (full batch).
        lr_alpha, lr_beta: learning rates (defaults: unseen domains; see TSA_LEARNING_RATES).
        device: "cpu", "cuda", ...; default CUDA when available, else CPU.

    Raises:
        InvalidInput: bad shapes, fewer than 2 classes, or non-finite images.
    """
    dev = _device(device)
    x, y, n_classes = _support(images, labels, dev)
    model = with_adapters(backbone).to(dev).eval()
    _freeze(model.parameters())
    alphas = [a.alpha.weight.requires_grad_(True) for a in adapters_of(model).values()]
    beta = alignment_map(_feature_dim(backbone), device=dev)
    groups = [{"params": alphas, "lr": lr_alpha}, {"params": list(beta.parameters()), "lr": lr_beta}]
    losses = _fit(lambda: beta(model(x)), torch.optim.Adadelta(groups, **ADADELTA), y, n_classes, steps)
    model.cpu()
    _freeze(model.parameters())
    beta_np = beta.weight.detach().cpu().numpy().astype(np.float32, copy=True)
    return TSAResult(model, beta_np, losses, float(lr_alpha), float(lr_beta), int(steps), dev.type)


def fit_bn_affine(
    backbone: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    steps: int = ADAPT_STEPS,
    lr: float | None = None,
    optimizer: str = "adadelta",
    device: str | torch.device | None = None,
) -> BNAffineResult:
    """Fit only the BatchNorm weights and biases of a copy of `backbone` on one task's support set.

    Arguments as `fit_tsa`; `optimizer` is 'adadelta' (default, lr 0.5) or 'olor' (OLOR's Adam with
    rollback towards the pretrained BN weights, lr 1e-3); `lr` overrides the optimiser's default rate.

    Raises:
        InvalidInput: bad inputs, an unknown optimizer, or the backbone has no affine BatchNorm.
    """
    if optimizer not in BN_AFFINE_OPTIMIZERS:
        raise InvalidInput(f"unknown BN-affine optimizer {optimizer!r}; choose one of {', '.join(BN_AFFINE_OPTIMIZERS)}")
    if lr is None:
        lr = BN_AFFINE_OLOR_LR if optimizer == "olor" else BN_AFFINE_LR
    dev = _device(device)
    x, y, n_classes = _support(images, labels, dev)
    model = copy.deepcopy(backbone).to(dev).eval()
    _freeze(model.parameters())
    keys, params = _bn_affine_parameters(model)
    if optimizer == "olor":
        from fsdeploy.train.olor import OLORAdam

        opt: torch.optim.Optimizer = OLORAdam(params, lr=lr)  # named_modules order: shallow tensors first
    else:
        opt = torch.optim.Adadelta([{"params": params, "lr": lr}], **ADADELTA)
    losses = _fit(lambda: model(x), opt, y, n_classes, steps)
    model.cpu()
    _freeze(model.parameters())
    return BNAffineResult(model, keys, losses, float(lr), int(steps), dev.type, optimizer)


def tsa_adapt_macs(backbone: nn.Module, img_size: int | tuple[int, int], n_support: int, steps: int = ADAPT_STEPS) -> int:
    """Multiply-accumulates of `fit_tsa`: steps x n_support x (forward + backward) per image.

    Counted layers are every Conv2d and Linear of the adapter network plus beta, measured with forward
    hooks at batch 1 (MACs = output elements x input channels per group x kernel area; all are linear in
    the batch). Backward convention, per layer with forward MACs m: + m for its input gradient when its
    input requires grad (every layer downstream of the first adapter; not the stem, not the first block's
    first conv and its adapter), + m for its weight gradient when the weight is trained (the adapters and
    beta). So backward ~= 1x forward, not 2x, because the frozen convs need no weight gradients.
    Not counted: BatchNorm, activations, pooling, the prototype/cosine loss (O(N K D)), optimiser updates,
    and the final support embedding pass used by the head afterwards.
    """
    model = with_adapters(backbone).eval()
    _freeze(model.parameters())
    for adapter in adapters_of(model).values():
        adapter.alpha.weight.requires_grad_(True)
    beta = alignment_map(_feature_dim(backbone), device=_param_device(model))
    return int(steps) * int(n_support) * _step_macs_per_image(lambda x: beta(model(x)), [model, beta], model, img_size)


def bn_affine_adapt_macs(backbone: nn.Module, img_size: int | tuple[int, int], n_support: int, steps: int = ADAPT_STEPS) -> int:
    """Multiply-accumulates of `fit_bn_affine`, same convention as `tsa_adapt_macs`.

    BN weight gradients are elementwise (not MACs); every conv after the stem's BatchNorm pays its input gradient.
    """
    model = copy.deepcopy(backbone).eval()
    _freeze(model.parameters())
    _bn_affine_parameters(model)
    return int(steps) * int(n_support) * _step_macs_per_image(model, [model], model, img_size)



def _fit(
    forward: Callable[[], torch.Tensor], optimiser: torch.optim.Optimizer, labels: torch.Tensor, n_classes: int,
    steps: int,
) -> tuple[float, ...]:
    from fsdeploy.steps import step

    losses = []
    for i in range(int(steps)):
        optimiser.zero_grad(set_to_none=True)
        loss = ncc_cosine_loss(forward(), labels, n_classes)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        step("fitting on the support set", i + 1, int(steps), f"loss {losses[-1]:.3f}")
    return tuple(losses)


def _bn_affine_parameters(model: nn.Module) -> tuple[tuple[str, ...], list[nn.Parameter]]:
    keys, params = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            for attr in ("weight", "bias"):
                p = getattr(module, attr)
                p.requires_grad_(True)
                keys.append(f"{name}.{attr}")
                params.append(p)
    if not params:
        raise InvalidInput(f"{type(model).__name__} has no affine BatchNorm layers; BN-affine needs a BatchNorm backbone")
    return tuple(keys), params


def _support(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).detach()
    raw = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 4 or not x.is_floating_point():
        raise InvalidInput(f"support images must be a float (N, C, H, W) batch, got {x.dtype} of shape {tuple(x.shape)}")
    if raw.shape != (x.shape[0],) or not np.issubdtype(raw.dtype, np.integer):
        raise InvalidInput(f"labels must be {x.shape[0]} integers (one per image), got {raw.dtype} of shape {raw.shape}")
    classes, index = np.unique(raw, return_inverse=True)
    if len(classes) < 2:
        raise InvalidInput(f"a task needs at least 2 classes in its support set, found {len(classes)}")
    if not torch.isfinite(x).all():
        raise InvalidInput("support images contain NaN or inf; check the preprocessing")
    return x.to(dev, torch.float32), torch.as_tensor(index, dtype=torch.long, device=dev), len(classes)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _freeze(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)


def _feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "num_features", None)
    if not isinstance(dim, int):
        raise InvalidInput(f"{type(backbone).__name__} has no integer num_features; pass a timm backbone")
    return dim


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _step_macs_per_image(
    forward: Callable[[torch.Tensor], torch.Tensor], modules: list[nn.Module], model: nn.Module, img_size: int | tuple[int, int]
) -> int:
    """Forward + backward MACs of one image, from hooks on every Conv2d/Linear (see tsa_adapt_macs)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    x = torch.zeros(1, first_conv.in_channels, int(h), int(w), device=_param_device(model))
    total = 0

    def count(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            per_output = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            per_output = layer.in_features
        macs = output.numel() * per_output
        total += macs * (1 + int(inputs[0].requires_grad) + int(layer.weight.requires_grad))

    layers = [m for mod in modules for m in mod.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [layer.register_forward_hook(count) for layer in layers]
    try:
        with torch.enable_grad():
            forward(x)
    finally:
        for handle in handles:
            handle.remove()
    return total
