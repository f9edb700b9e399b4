"""L2T-ww building blocks: feature taps, the meta-networks, the weighted matching loss, the bilevel meta-gradient.

"Learning What and Where to Transfer" (Jang, Lee, Hwang, Shin; ICML 2019). A teacher's intermediate features
guide a student of another architecture. For every (teacher layer m, student layer n) pair the student has a
linear transform r_θ (a 1x1 convolution from the student's channels to the teacher's), and the matching loss is

    L_wfm = Σ_(m,n) λ^{m,n}(x) · Σ_c w_c^{m,n}(x) · mean_hw (T_m(x)_c − r_θ(S_n(x))_c)²        (β × this, per sample)

where meta-networks read the teacher's pooled feature T_m(x): "what" gives w^{m,n} = softmax(linear) over the
teacher's channels (zero-initialised, so uniform at first), "where" gives λ^{m,n} = relu6(linear) with its bias
at 1. The meta-networks φ learn by lookahead (the official code's `MetaSGD` with rollback): from the student's
current θ take T SGD steps on L_wfm, then one on the target cross-entropy, and move φ along −∇_φ L_ce(θ_{T+1});
the lookahead is then discarded. Here the lookahead is unrolled functionally (torch.func.functional_call with
create_graph), SGD with momentum and weight decay as torch.optim.SGD defines them, starting from the real
optimiser's momentum buffers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsdeploy.errors import InvalidInput

Pair = tuple[int, int]  # (teacher layer index, student layer index) into the tapped layers


def tap_layers(model: nn.Module, *, skip_stem: bool = True) -> list[str]:
    """Module names whose outputs are the model's feature pyramid (timm's `feature_info`), stem level dropped.

    The paper (and its official code) match the four ResNet stages and not the stem; timm's feature_info lists the
    stem first for every CNN family, so dropping index 0 gives the same four levels for resnets, EfficientNets and
    MobileNets.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise InvalidInput(f"{type(model).__name__} has no timm feature_info; pick a timm CNN or ViT for distillation")
    names = [f["module"] for f in info]
    return names[1:] if skip_stem and len(names) > 1 else names


def as_map(out: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """A tapped output as (B, C, H, W): CNN maps pass through; ViT tokens (B, N, C) drop prefix tokens and fold."""
    if out.ndim == 4:
        return out
    if out.ndim == 3:
        tokens = out[:, prefix_tokens:]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise InvalidInput(f"cannot fold {tokens.shape[1]} tokens into a square map; use a square input size")
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    raise InvalidInput(f"tapped feature of shape {tuple(out.shape)} is neither (B, C, H, W) nor (B, N, C)")


class FeatureTaps:
    """Forward hooks that keep the outputs of named modules during each forward, in a fixed order."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise InvalidInput(f"{type(model).__name__} has no module {missing[0]!r} to tap")
        self.names = list(names)
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str) -> Callable[..., None]:
        def keep(_m: nn.Module, _inp: Any, out: Any) -> None:
            self.outputs[name] = out[0] if isinstance(out, (tuple, list)) else out

        return keep

    def features(self) -> list[torch.Tensor]:
        """The last forward's tapped outputs as (B, C, H, W) maps."""
        return [as_map(self.outputs[n], self.prefix) for n in self.names]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def channels_of(model: nn.Module, names: Sequence[str], img_size: int) -> list[int]:
    """Channel count of each tapped layer, from one forward at `img_size`."""
    taps = FeatureTaps(model, names)
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
        model.train(was)
        return [f.shape[1] for f in taps.features()]
    finally:
        taps.close()


class _HardSigmoid2(nn.Module):
    """relu6(x + 3) / 6, as nn.Hardsigmoid, built from ops with a second derivative (torch has none for hardsigmoid's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class _HardSwish2(nn.Module):
    """x · relu6(x + 3) / 6, as nn.Hardswish, twice differentiable through autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def twice_differentiable_(model: nn.Module) -> nn.Module:
    """Swap nn.Hardsigmoid / nn.Hardswish for equal composite modules so the lookahead can differentiate a gradient.

    They have no parameters, so the state dict (and the saved backbone, which export rebuilds from timm) is
    unchanged; MobileNetV3 students need this.
    """
    swaps = {nn.Hardsigmoid: _HardSigmoid2, nn.Hardswish: _HardSwish2}
    for name, child in list(model.named_children()):
        new = swaps.get(type(child))
        if new is not None:
            setattr(model, name, new())
        else:
            twice_differentiable_(child)
    return model


def all_pairs(n_teacher: int, n_student: int) -> list[Pair]:
    """Every (teacher layer, student layer) pair, as the paper's 16 pairs for four stages each."""
    return [(m, n) for m in range(n_teacher) for n in range(n_student)]


def parse_pairs(text: str, n_teacher: int, n_student: int) -> list[Pair]:
    """`all` or `m-n,m-n,...` (0-based over the tapped layers) -> pairs; raises InvalidInput naming the fix."""
    if text.strip() == "all":
        return all_pairs(n_teacher, n_student)
    pairs = []
    for item in text.split(","):
        try:
            m, n = (int(v) for v in item.strip().split("-"))
        except ValueError:
            raise InvalidInput(f"--pairs item {item!r} is not 'm-n'; write e.g. 3-3,2-2 or 'all'") from None
        if not (0 <= m < n_teacher and 0 <= n < n_student):
            raise InvalidInput(f"--pairs {item}: teacher layers are 0..{n_teacher - 1}, student layers 0..{n_student - 1}")
        pairs.append((m, n))
    return pairs


class ChannelWeights(nn.Module):
    """"What to transfer": per pair, softmax over the teacher's channels of a linear map of its pooled feature."""

    def __init__(self, teacher_channels: Sequence[int], pairs: Sequence[Pair]) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.nets = nn.ModuleList(nn.Linear(teacher_channels[m], teacher_channels[m]) for m, _ in self.pairs)
        for lin in self.nets:  # zero init: uniform 1/C weights before any meta step
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, teacher_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(B, C_m) weights per pair, rows summing to 1."""
        return [F.softmax(lin(teacher_feats[m].mean((2, 3))), dim=1) for lin, (m, _) in zip(self.nets, self.pairs)]


class PairWeights(nn.Module):
    """"Where to transfer": per pair, relu6 of a linear map of the teacher's pooled feature (bias starts at `init`)."""

    def __init__(self, teacher_channels: Sequence[int], pairs: Sequence[Pair], *, init: float = 1.0) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.nets = nn.ModuleList(nn.Linear(teacher_channels[m], 1) for m, _ in self.pairs)
        for lin in self.nets:
            nn.init.constant_(lin.bias, init)

    def forward(self, teacher_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(B,) non-negative weight per pair and sample."""
        return [F.relu6(lin(teacher_feats[m].mean((2, 3)))).squeeze(1) for lin, (m, _) in zip(self.nets, self.pairs)]


class MatchingTransforms(nn.ModuleList):
    """The student's r_θ: one 1x1 convolution per pair, student channels -> teacher channels (trained with θ)."""

    def __init__(self, teacher_channels: Sequence[int], student_channels: Sequence[int], pairs: Sequence[Pair]) -> None:
        super().__init__(nn.Conv2d(student_channels[n], teacher_channels[m], 1) for m, n in pairs)
        self.pairs = list(pairs)


def matching_loss(
    teacher_feats: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    transforms: Sequence[nn.Module],
    pairs: Sequence[Pair],
    *,
    channel_weights: Sequence[torch.Tensor] | None = None,
    pair_weights: Sequence[torch.Tensor] | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """L2T-ww's weighted feature-matching loss, averaged over the batch.

    Args:
        teacher_feats / student_feats: tapped maps (B, C, H, W) per layer.
        transforms: r_θ per pair (applied to the student map).
        channel_weights: (B, C_m) per pair; None = uniform (mean over channels).
        pair_weights: (B,) per pair; None = 1 for every pair (uniform feature matching).
        beta: the loss's overall weight (the official code's --beta 0.5).
    """
    total = teacher_feats[0].new_zeros(())
    for i, (m, n) in enumerate(pairs):
        s = transforms[i](student_feats[n])
        t = teacher_feats[m]
        if t.shape[-2:] != s.shape[-2:]:  # the teacher map is resized to the student's grid
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        per_channel = (t - s).pow(2).mean((2, 3))  # (B, C_m)
        per_sample = per_channel.mean(1) if channel_weights is None else (per_channel * channel_weights[i]).sum(1)
        if pair_weights is not None:
            per_sample = per_sample * pair_weights[i]
        total = total + beta * per_sample.mean()
    return total


def sgd_lookahead(
    params: Mapping[str, torch.Tensor],
    losses: Sequence[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    buffers: Mapping[str, torch.Tensor] | None = None,
    create_graph: bool = True,
) -> dict[str, torch.Tensor]:
    """Differentiable SGD steps, one per loss in `losses`, as torch.optim.SGD (dampening 0, no Nesterov) takes them.

    Args:
        params: name -> tensor (requires grad); not modified.
        losses: each maps the current params to a scalar; step k uses losses[k].
        buffers: the optimiser's momentum buffers to start from (a missing one starts as the first gradient).
        create_graph: keep the graph so the result can be differentiated w.r.t. whatever the losses depend on.

    Returns:
        the params after all steps.
    """
    cur = dict(params)
    bufs = dict(buffers or {})
    names = list(cur)
    for loss_fn in losses:
        loss = loss_fn(cur)
        grads = torch.autograd.grad(loss, [cur[k] for k in names], create_graph=create_graph, allow_unused=True)
        nxt = {}
        for k, g in zip(names, grads):
            p = cur[k]
            d = torch.zeros_like(p) if g is None else g
            if weight_decay:
                d = d + weight_decay * p
            if momentum:
                d = d if k not in bufs else momentum * bufs[k] + d
                bufs[k] = d
            nxt[k] = p - lr * d
        cur = nxt
    return cur


def meta_gradient(
    params: Mapping[str, torch.Tensor],
    meta_params: Sequence[torch.Tensor],
    matching: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    target: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """∇_φ L_target(θ_{T+1}): T lookahead steps on the matching loss, one on the target loss, as in L2T-ww.

    Args:
        params: the student's θ (detached copies that require grad).
        meta_params: φ, which `matching` depends on.
        matching: θ -> L_wfm(θ | φ).
        target: θ -> L_ce(θ).
        steps: T, the matching steps before the target step.

    Returns:
        (L_target(θ_{T+1}) detached, gradient per meta parameter; zeros where φ had no influence).
    """
    if steps < 1:
        raise InvalidInput(f"L2T-ww needs at least one inner matching step; got {steps}")
    theta = sgd_lookahead(params, [matching] * steps + [target], lr=lr, momentum=momentum,
                          weight_decay=weight_decay, buffers=buffers)
    outer = target(theta)
    grads = torch.autograd.grad(outer, list(meta_params), allow_unused=True)
    return outer.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]


@contextmanager
def functional(module: nn.Module) -> Iterator[Callable[..., Any]]:
    """`call(params, *args)`: run `module` with `params` in place of its parameters and cloned buffers.

    The buffers are cloned so that BatchNorm's running statistics are not moved by a lookahead that is thrown
    away (the official code restores them with the rest of the state).
    """
    buffers = {k: v.clone() for k, v in module.named_buffers()}

    def call(params: Mapping[str, torch.Tensor], *args: Any) -> Any:
        return torch.func.functional_call(module, ({**params}, buffers), args)

    yield call
