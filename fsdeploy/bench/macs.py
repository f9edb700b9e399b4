"""Count multiply-accumulates (MACs) of a torch model's forward and backward on given inputs.

Counting happens at the aten level with a `TorchDispatchMode`, so functional calls (`F.linear`,
`torch.matmul`, `x @ w`, `F.scaled_dot_product_attention`) are seen as well as modules. Counted ops:

- convolutions (`aten.convolution`, any groups): MACs = output elements x (C_in / groups) x kernel area;
  transposed convolutions: input elements x (C_out / groups) x kernel area.
- matrix products (`mm`, `addmm`, `bmm`, `baddbmm`, `mv`, `addmv`, `dot`; `linear`, `matmul` and `einsum`
  decompose into these): n x k x m per product. Bias adds are not MACs.
- fused attention (`_scaled_dot_product_*_attention`): decomposed into its two products,
  Q K^T (L x S x E per head) and P V (L x S x Ev per head).

Elementwise work (activations, normalisation, softmax, pooling, adds) is not counted: `macs` means
multiply-accumulates of the products above, the convention of the FLOP tables in the few-shot literature
(e.g. UpperCaSE, Patacchiola et al., NeurIPS 2022, Fig. 1), and `torch.utils.flop_counter` / 2.

Backward convention (`count_backward_macs`): every counted product ``Y = A * B`` costs, in backward,
one forward's MACs for each operand whose gradient is needed (dA = dY B^T, dB = A^T dY), and nothing else.
An operand needs a gradient when it requires grad: a trainable weight, or an activation downstream of
any trainable parameter. So
(a) all weights trainable: each layer costs input grad + weight grad = 2x its forward, except the first
    layer whose input (the image) needs no gradient, hence backward ~= 2x forward;
(b) frozen backbone with small trainable modules (adapters, BN affine, CaSE): layers after the first
    trainable module pay one forward for their input grad, trainable layers also pay their weight grad,
    layers before it pay nothing, hence backward ~= 1x forward (+ the trainable modules' weight grads).
Attention backward counts dQ, dK (L S E each) when Q or K need grads, dP = dO V^T (L S Ev) when Q or K
need grads and dV (L S Ev) when V does; recomputation inside fused kernels is not counted.
Per-image MACs are the MACs at batch 1; every counted op is linear in the batch.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fsdeploy.errors import InvalidInput

aten = torch.ops.aten

Trainable = Callable[[str], bool] | Collection[str] | None


@dataclass(frozen=True)
class MacReport:
    """Counted MACs of one pass.

    Attributes:
        total: all counted MACs.
        by_op: MACs per aten op name (e.g. 'convolution', 'addmm', 'sdpa').
        by_module: MACs per innermost module (qualified name; '' is the root module itself).
    """

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)

    def under(self, prefix: str) -> int:
        """MACs of the module `prefix` and everything inside it (e.g. 'layer4' or 'blocks.11')."""
        return sum(v for k, v in self.by_module.items() if k == prefix or k.startswith(prefix + "."))

    def scaled(self, factor: int) -> MacReport:
        """The same report multiplied by an integer factor (e.g. images per task)."""
        return MacReport(
            self.total * factor,
            {k: v * factor for k, v in self.by_op.items()},
            {k: v * factor for k, v in self.by_module.items()},
        )


# ---- per-op rules: forward MACs and the operands of the product (each pays one forward per needed grad)


def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    return math.prod(shape)


def _mm_rule(a: torch.Tensor, b: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    # a (..., n, k) @ b (..., k, m): batch x n x k x m
    batch = _numel(a.shape[:-2])
    return batch * a.shape[-2] * a.shape[-1] * b.shape[-1], [a, b]


def _conv_rule(args: tuple[Any, ...], out: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    x, w, transposed = args[0], args[1], bool(args[6])
    kernel_area = _numel(w.shape[2:])
    if transposed:
        # weight (C_in, C_out/groups, k...): each input element scatters into C_out/groups x kernel outputs
        return x.numel() * w.shape[1] * kernel_area, [x, w]
    # weight (C_out, C_in/groups, k...): each output element is a (C_in/groups x kernel) dot product
    return out.numel() * w.shape[1] * kernel_area, [x, w]


def _sdpa_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    # q (..., L, E), k (..., S, E), v (..., S, Ev); leading dims follow q (grouped-query heads broadcast)
    lead = _numel(q.shape[:-2])
    length, src, e, ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return lead * length * src * e, lead * length * src * ev


_SDPA_OPS = tuple(
    getattr(aten, name)
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(aten, name)
)


def _count(func: Any, args: tuple[Any, ...], out: Any) -> tuple[str, int, int] | None:
    """(op name, forward MACs, backward MACs under the module-docstring convention) or None if not counted."""
    packet = func.overloadpacket
    if packet in (aten.mm, aten.bmm):
        fwd, ops = _mm_rule(args[0], args[1])
    elif packet in (aten.addmm, aten.baddbmm):
        fwd, ops = _mm_rule(args[1], args[2])
    elif packet in (aten.mv, aten.dot):
        fwd, ops = args[0].numel(), [args[0], args[1]]  # (n, k) @ (k,) or (k,) . (k,)
    elif packet is aten.addmv:
        fwd, ops = args[1].numel(), [args[1], args[2]]
    elif packet in (aten.convolution, aten._convolution):
        fwd, ops = _conv_rule(args, out)
    elif packet in _SDPA_OPS:
        q, k, v = args[0], args[1], args[2]
        qk, pv = _sdpa_parts(q, k, v)
        qk_grad = q.requires_grad or k.requires_grad
        bwd = qk * (int(q.requires_grad) + int(k.requires_grad)) + pv * (int(qk_grad) + int(v.requires_grad))
        return "sdpa", qk + pv, bwd
    else:
        return None
    bwd = fwd * sum(int(t.requires_grad) for t in ops)
    return packet.__name__.split(".")[-1], fwd, bwd


class _Counter(TorchDispatchMode):
    """Adds up forward and backward MACs per op and per innermost module while ops run."""

    def __init__(self, module_stack: list[str]) -> None:
        super().__init__()
        self.stack = module_stack
        self.fwd_op: dict[str, int] = defaultdict(int)
        self.fwd_mod: dict[str, int] = defaultdict(int)
        self.bwd_op: dict[str, int] = defaultdict(int)
        self.bwd_mod: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # requires_grad of the inputs tells which gradients backward will need (autograd sits above us)
        counted = _count(func, args, out)
        if counted is not None:
            name, fwd, bwd = counted
            where = self.stack[-1] if self.stack else ""
            self.fwd_op[name] += fwd
            self.fwd_mod[where] += fwd
            if bwd:
                self.bwd_op[name] += bwd
                self.bwd_mod[where] += bwd
        return out


@contextmanager
def _module_names(model: nn.Module) -> Iterator[list[str]]:
    """A live stack of the qualified names of the modules currently running their forward."""
    stack: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            stack.append(name)

        return hook

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()  # returning None keeps the module's output untouched

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, tuple) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return inputs
    raise InvalidInput(
        f"count_macs expects a tensor or a tuple of tensors, got {type(inputs).__name__}; "
        "pass e.g. torch.zeros(1, 3, 224, 224)"
    )


def _run(model: nn.Module, inputs: Any, *, grad: bool) -> _Counter:
    args = _as_tuple(inputs)
    with _module_names(model) as stack:
        counter = _Counter(stack)
        with torch.set_grad_enabled(grad), counter:
            model(*args)
    return counter


def count_macs(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> MacReport:
    """Forward MACs of `model(*inputs)`, per op and per innermost module.

    Args:
        model: any torch module; run once as is (its train/eval mode is left alone), without autograd.
        inputs: one tensor or a tuple of positional tensors; use batch 1 for per-image MACs.
    Returns:
        MacReport with the total and its split.
    Raises:
        InvalidInput: inputs are not tensors.
    """
    c = _run(model, inputs, grad=False)
    return MacReport(sum(c.fwd_op.values()), dict(c.fwd_op), dict(c.fwd_mod))


def _trainable_predicate(trainable: Trainable) -> Callable[[str], bool]:
    if trainable is None:
        return lambda _name: True
    if callable(trainable):
        return trainable
    names = frozenset(trainable)
    return names.__contains__


@contextmanager
def _requires_grad(model: nn.Module, trainable: Callable[[str], bool]) -> Iterator[int]:
    """Set requires_grad per the predicate for the duration; yields the count of trainable numbers."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    n_trainable = 0
    try:
        for n, p in model.named_parameters():
            wanted = bool(trainable(n))
            p.requires_grad_(wanted)
            n_trainable += p.numel() if wanted else 0
        yield n_trainable
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def count_backward_macs(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    trainable: Trainable = None,
) -> MacReport:
    """Backward MACs of one training step's `model(*inputs)` when only `trainable` parameters learn.

    The convention (module docstring): each counted product pays one forward's MACs per operand whose
    gradient is needed. No backward pass is run; gradient needs are read from requires_grad flags during
    one forward with autograd on. Inputs are treated as not requiring grad unless they already do.

    Args:
        model: torch module; its parameters' requires_grad flags are restored afterwards.
        inputs: tensor or tuple of tensors (batch 1 gives per-image MACs).
        trainable: None for every parameter, a set of parameter names, or a predicate on parameter names.
    Returns:
        MacReport of the backward pass (forward MACs are not included).
    """
    with _requires_grad(model, _trainable_predicate(trainable)):
        c = _run(model, inputs, grad=True)
    return MacReport(sum(c.bwd_op.values()), dict(c.bwd_op), dict(c.bwd_mod))


def count_params(model: nn.Module, trainable: Trainable = None) -> int:
    """Number of parameter elements selected by `trainable` (None: all of them)."""
    keep = _trainable_predicate(trainable)
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


def params_from(model: nn.Module, first: str) -> set[str]:
    """Names of the parameters registered at or after the first parameter under module `first`.

    timm registers modules in forward order, so `params_from(model, 'layer4.1')` is "the last block and
    everything after it" (final norm, head), the usual partial fine-tuning set.

    Raises:
        InvalidInput: `first` owns no parameters.
    """
    names = [n for n, _ in model.named_parameters()]
    for i, n in enumerate(names):
        if n.startswith(first + "."):
            return set(names[i:])
    raise InvalidInput(f"module {first!r} has no parameters in {type(model).__name__}; pick a block name that does")


def last_block(model: nn.Module) -> str:
    """Qualified name of the last child of the model's largest block sequence.

    The block sequence is the nn.Sequential / nn.ModuleList with at least two children holding the most
    parameters (resnet: 'layer4' -> 'layer4.1'; efficientnet: 'blocks' -> 'blocks.6'; ViT: 'blocks' ->
    'blocks.11'). Used to pick what partial fine-tuning trains.

    Raises:
        InvalidInput: the model has no such sequence.
    """
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 2:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, f"{name}.{len(module) - 1}" if name else str(len(module) - 1))
    if best is None:
        raise InvalidInput(f"{type(model).__name__} has no block sequence; name the partial fine-tuning block")
    return best[1]


def norm_affine_params(model: nn.Module) -> set[str]:
    """Names of the affine (weight, bias) parameters of every normalisation layer (BN-affine tuning)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    out = set()
    for mname, module in model.named_modules():
        if isinstance(module, norms):
            out.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
    return out


def summarise(report: MacReport, depth: int = 1) -> Mapping[str, int]:
    """MACs per module name truncated to `depth` components (e.g. depth 1: 'layer1', 'fc')."""
    out: dict[str, int] = defaultdict(int)
    for name, v in report.by_module.items():
        out[".".join(name.split(".")[:depth]) if name else ""] += v
    return dict(out)
