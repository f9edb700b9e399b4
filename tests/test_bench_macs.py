"""MAC counting: hand formulas on a tiny net, torch's FlopCounterMode / 2 on timm backbones and real backward passes."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fsdeploy.bench.macs import (
    count_backward_macs,
    count_macs,
    count_params,
    last_block,
    norm_affine_params,
    params_from,
    summarise,
)
from fsdeploy.errors import InvalidInput


class Tiny(nn.Module):
    """Every counted op kind once: conv, depthwise, grouped, transposed conv, functional matmul, SDPA, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.grp = nn.Conv2d(8, 16, 1, groups=2)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.wq = nn.Parameter(torch.randn(4, 4) * 0.1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.grp(self.dw(self.conv(x))))  # (1, 4, 8, 8)
        tokens = x.flatten(2).transpose(1, 2) @ self.wq  # (1, 64, 4)
        q = tokens[:, None]  # (1, 1, 64, 4)
        att = F.scaled_dot_product_attention(q, q, q)
        return self.fc(att.flatten(1))


def _tiny_parts() -> dict[str, int]:
    """Hand formulas for Tiny at 1x3x8x8: out elements x (C_in/groups) x kernel area, n x k x m, 2 L S E."""
    return {
        "conv": (8 * 8 * 8) * 3 * 9,
        "dw": (8 * 4 * 4) * (8 // 8) * 9,
        "grp": (16 * 4 * 4) * (8 // 2) * 1,
        "up": (16 * 4 * 4) * 4 * 4,  # transposed: input elements x (C_out/groups) x kernel area
        "wq": 64 * 4 * 4,
        "sdpa": 64 * 64 * 4 + 64 * 64 * 4,
        "fc": 256 * 10,
    }


def test_tiny_forward_matches_hand_formula_per_module() -> None:
    p = _tiny_parts()
    report = count_macs(Tiny().eval(), torch.randn(1, 3, 8, 8))
    assert report.total == sum(p.values())
    assert report.by_module == {
        "conv": p["conv"], "dw": p["dw"], "grp": p["grp"], "up": p["up"], "fc": p["fc"], "": p["wq"] + p["sdpa"],
    }
    assert report.by_op["sdpa"] == p["sdpa"]
    assert report.by_op["convolution"] == p["conv"] + p["dw"] + p["grp"] + p["up"]


def test_tiny_forward_matches_flop_counter_and_scales_with_batch() -> None:
    model, x = Tiny().eval(), torch.randn(3, 3, 8, 8)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    ours = count_macs(model, x)
    assert ours.total == fc.get_total_flops() // 2
    single = count_macs(model, x[:1])
    assert ours.total == 3 * single.total and single.scaled(3).by_module == ours.by_module


@pytest.mark.parametrize(
    ("trainable", "expected"),
    [
        # all weights: the first conv needs no input grad (the image), every other op pays input + weight grad
        (None, lambda p: p["conv"] + 2 * (p["dw"] + p["grp"] + p["up"] + p["wq"] + p["sdpa"] + p["fc"])),
        # only the classifier: its weight grad, nothing upstream
        ({"fc.weight"}, lambda p: p["fc"]),
        # a bias alone has no MAC-counted gradient
        ({"fc.bias"}, lambda p: 0),
        # a middle weight: its weight grad, then input grads downstream (SDPA: dQ, dK, dP, dV)
        ({"wq"}, lambda p: p["wq"] + 2 * p["sdpa"] + p["fc"]),
        ({"grp.weight"}, lambda p: p["grp"] + p["up"] + p["wq"] + 2 * p["sdpa"] + p["fc"]),
    ],
)
def test_tiny_backward_matches_hand_formula(trainable, expected) -> None:
    model = Tiny().eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = count_backward_macs(model, torch.randn(1, 3, 8, 8), trainable)
    assert report.total == expected(_tiny_parts())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored


class VectorOps(nn.Module):
    """Matrix-vector and dot products, which FlopCounterMode skips."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 7))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.dot(self.w @ x, torch.addmv(self.b, self.w, x))


def test_vector_products_match_hand_formula() -> None:
    model, x = VectorOps(), torch.randn(7)
    assert count_macs(model, x).by_op == {"mv": 5 * 7, "addmv": 5 * 7, "dot": 5}
    # weight grads of both products (x needs none), both operands of the dot
    assert count_backward_macs(model, x).total == 5 * 7 + 5 * 7 + 2 * 5


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {}), ("efficientnet_b0", {}), ("vit_tiny_patch16_224", {"img_size": 64})],
)
def test_timm_forward_within_one_percent_of_flop_counter(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    # FlopCounterMode does not count the CPU fused-attention op: give it the math path (plain matmuls)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    reference = fc.get_total_flops() / 2
    ours = count_macs(model, x)
    assert abs(ours.total - reference) <= 0.01 * reference
    assert sum(ours.by_module.values()) == ours.total == sum(ours.by_op.values())


def test_vit_attention_matmuls_are_counted_from_fused_sdpa() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, pretrained=False, num_classes=0).eval()
    report = count_macs(model, torch.randn(1, 3, 64, 64))
    tokens, heads, head_dim, depth = (64 // 16) ** 2 + 1, 3, 64, 12
    per_block = heads * tokens * tokens * head_dim * 2  # Q K^T and P V
    attention = report.by_op.get("sdpa", 0) + report.by_op.get("bmm", 0)
    assert attention == depth * per_block
    assert report.under("blocks.0.attn") - report.under("blocks.0.attn.qkv") - report.under("blocks.0.attn.proj") == per_block


@pytest.mark.parametrize("which", ["all", "bn_affine", "last_block", "one_conv"])
def test_resnet_backward_matches_a_real_backward_under_flop_counter(which: str) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    trainable = {
        "all": None,
        "bn_affine": norm_affine_params(model),
        "last_block": params_from(model, last_block(model)),
        "one_conv": {"layer2.0.conv1.weight"},
    }[which]
    x = torch.randn(1, 3, 64, 64)
    ours = count_backward_macs(model, x, trainable)
    keep = trainable if trainable is not None else {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    out = model(x)
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert ours.total == fc.get_total_flops() // 2


def test_backward_conventions_are_near_two_and_one_forward() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    fwd = count_macs(model, x).total
    first_conv = count_macs(model.conv1, torch.randn(1, 3, 64, 64)).total
    assert count_backward_macs(model, x).total == 2 * fwd - first_conv
    # BN-affine: bn1 trains, so everything after the stem conv pays exactly its input grad
    assert count_backward_macs(model, x, norm_affine_params(model)).total == fwd - first_conv


def test_block_helpers_name_the_last_block_and_what_follows() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    assert last_block(model) == "layer4.1"
    names = params_from(model, "layer4.1")
    assert "layer4.1.conv1.weight" in names and "layer4.0.conv1.weight" not in names
    assert count_params(model, names) == sum(p.numel() for p in model.layer4[1].parameters())
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert all(".bn" in n or n.startswith("bn1") or "downsample.1" in n for n in norm_affine_params(model))
    assert summarise(count_macs(model, torch.randn(1, 3, 32, 32)), depth=1).keys() >= {"conv1", "layer1", "layer4"}


def test_errors_name_what_to_pass() -> None:
    model = Tiny()
    with pytest.raises(InvalidInput, match="tensor or a tuple of tensors"):
        count_macs(model, [torch.zeros(1, 3, 8, 8)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="has no parameters"):
        params_from(model, "nothing")
    with pytest.raises(InvalidInput, match="no block sequence"):
        last_block(model)
