"""Task-specific residual adapters (TSA) for frozen timm ResNets.

Li, Liu, Bilen, "Cross-domain Few-shot Learning with Task-specific Adapters", CVPR 2022 (arXiv 2107.00358).
Every 3x3 conv inside a residual block gets a parallel 1x1 conv alpha (C_out x C_in, the conv's stride, no
padding) whose output is added to the conv's output before its BatchNorm: y = conv(x) + alpha(x). Before each
task alpha is set to 1e-4 x the (rectangular) identity: the released code's "residual, matrix, eye" setting.
The pre-classifier alignment beta (Li, Liu, Bilen, "Universal Representation Learning from Multiple Domains
for Few-shot Classification", ICCV 2021) is a D x D map on pooled features, identity at the start.

Why a wrapper around the conv: a 1x1 conv with the same stride reads exactly the input pixel that the 3x3
kernel's centre tap reads, so after fitting, alpha folds exactly into the conv weight
(`fsdeploy.modules.fold`) and the deployed graph is the plain backbone's. The wrapper refuses convs where
that alignment does not hold, and for grouped convs alpha is grouped the same way so the fold stays exact.
Where adapters go is the ("tsa", family) rule of `fsdeploy.modules.placement`, applied by `with_adapters`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fsdeploy.backbones import family_of
from fsdeploy.errors import InvalidInput
from fsdeploy.modules.placement import families, find_sites, placement_for

ALPHA_INIT_SCALE = 1e-4  # TSA's residual-adapter init: 1e-4 x identity


def centre_tap_problem(conv: nn.Module) -> str | None:
    """Why a 1x1 conv with `conv`'s stride would NOT read the pixel under `conv`'s centre tap, or None.

    The centre tap of a kernel k (odd) with dilation d and padding p reads input o*s - p + d*(k-1)/2 for
    output o; a 1x1 conv without padding reads o*s. They coincide when p = d*(k-1)/2 in each spatial dim.
    """
    if not isinstance(conv, nn.Conv2d):
        return f"is a {type(conv).__name__}, not a torch.nn.Conv2d"
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return f"is a {type(conv).__name__} with its own forward (e.g. TF-style 'same' padding), not a plain Conv2d"
    kernel, dilation = conv.kernel_size, conv.dilation
    if any(k % 2 == 0 for k in kernel):
        return f"has an even kernel {tuple(kernel)}; its centre tap is undefined"
    if isinstance(conv.padding, str):
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)) if conv.padding == "same" else (0, 0)
    else:
        padding = tuple(conv.padding)
    wanted = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    if padding != wanted:
        return f"has padding {padding} but kernel {tuple(kernel)} with dilation {tuple(dilation)} needs {wanted} to be centred"
    return None


def rectangular_identity(out_channels: int, in_per_group: int, groups: int) -> torch.Tensor:
    """(out_channels, in_per_group, 1, 1): the identity of each group's block, as a grouped 1x1 kernel."""
    per_group = torch.eye(out_channels // groups, in_per_group)
    return per_group.repeat(groups, 1)[:, :, None, None]


class ResidualAdapterConv(nn.Module):
    """A frozen conv plus a parallel 1x1 adapter: conv(x) + alpha(x), added before the following BatchNorm.

    Args:
        conv: the frozen k x k conv (odd kernel, centred padding; see `centre_tap_problem`).
        init_scale: alpha starts at init_scale x identity (TSA: 1e-4).

    Raises:
        InvalidInput: the 1x1 path would not line up with the conv's centre tap.
    """

    def __init__(self, conv: nn.Conv2d, *, init_scale: float = ALPHA_INIT_SCALE) -> None:
        super().__init__()
        problem = centre_tap_problem(conv)
        if problem:
            raise InvalidInput(f"cannot attach a residual adapter: the conv {problem}; adapt a different layer")
        self.conv = conv
        self.alpha = nn.Conv2d(
            conv.in_channels, conv.out_channels, 1, stride=conv.stride, groups=conv.groups, bias=False,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        self.reset(init_scale)

    def reset(self, scale: float = ALPHA_INIT_SCALE) -> None:
        """Set alpha to `scale` x the (rectangular, per-group) identity."""
        eye = rectangular_identity(self.alpha.out_channels, self.alpha.in_channels // self.alpha.groups, self.alpha.groups)
        eye = eye.to(self.alpha.weight)  # scale in the weight's dtype: 1e-4 is not exact in float32
        with torch.no_grad():
            self.alpha.weight.copy_(scale * eye)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.alpha(x)


def model_family(model: nn.Module) -> str:
    """timm family of a model object, from the architecture recorded in its pretrained_cfg."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise InvalidInput(
            f"cannot tell the timm family of this {type(model).__name__}; pass family= (one of {', '.join(families('tsa'))})"
        )
    return family_of(arch)


def adapters_of(model: nn.Module) -> dict[str, ResidualAdapterConv]:
    """The residual adapters in `model`, by module name (the plain backbone's name of the wrapped conv)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ResidualAdapterConv)}


def with_adapters(
    backbone: nn.Module, *, family: str | None = None, init_scale: float = ALPHA_INIT_SCALE
) -> nn.Module:
    """A copy of `backbone` with a residual adapter around every conv its family's placement rule selects.

    The backbone itself is left untouched; its weights in the copy keep their requires_grad (frozen).

    Args:
        backbone: a timm model (e.g. from `create_backbone`).
        family: timm family; read from `backbone.pretrained_cfg` when omitted.
        init_scale: alpha starts at init_scale x identity.

    Raises:
        InvalidInput: the backbone already holds adapters, or the rule selects no conv.
        UnknownName: the family has no placement rule.
    """
    if adapters_of(backbone):
        raise InvalidInput("this backbone already holds residual adapters; pass the plain backbone")
    rule = placement_for("tsa", family or model_family(backbone))
    model = copy.deepcopy(backbone)
    sites = find_sites(model, rule)
    for name in sites:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ResidualAdapterConv(getattr(parent, child), init_scale=init_scale))
    return model


def reset_adapters(model: nn.Module, scale: float = ALPHA_INIT_SCALE) -> int:
    """Set every adapter's alpha to `scale` x identity (TSA does this before each task); returns the count."""
    found = adapters_of(model)
    for adapter in found.values():
        adapter.reset(scale)
    return len(found)


def alignment_map(dim: int, *, device: torch.device | str | None = None) -> nn.Linear:
    """The pre-classifier alignment beta: a bias-free D x D linear map, identity at the start.

    `mapped = feats @ beta.weight.T` (beta.weight[o, i] maps input channel i to output channel o).
    """
    beta = nn.Linear(dim, dim, bias=False, device=device)
    with torch.no_grad():
        beta.weight.copy_(torch.eye(dim, device=device, dtype=beta.weight.dtype))
    return beta
