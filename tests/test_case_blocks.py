"""CaSE blocks and CaseNet in torch: placement counts, parameter counts, identity at init, the explicit modes
against an independent hook-based reference, and the chunked stage chain against the one-batch context."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from fsdeploy.backbones import family_of
from fsdeploy.errors import UnknownName
from fsdeploy.modules.case import CaseBlock, case_hidden, case_param_count
from fsdeploy.modules.casenet import CaseNet, run_stages_torch
from fsdeploy.modules.placement import families, placement_for
from tests.helpers import realistic_

# one test model per placement rule, with the block count the issue specifies (P14: follows the registry)
RULE_CASES = {"efficientnet": ("efficientnet_b0", 19), "resnet": ("resnet18", 17)}


def test_every_rule_has_a_test_case() -> None:
    assert set(RULE_CASES) == set(families("case"))


def _net(name: str, seed: int = 0, random_case: bool = True) -> CaseNet:
    torch.manual_seed(seed)
    backbone = realistic_(timm.create_model(name, num_classes=0).eval(), seed)
    for p in backbone.parameters():
        p.requires_grad_(False)
    net = CaseNet(backbone, family=family_of(name)).eval()
    if random_case:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for case in net.cases:
                last = case.mlp[-1]
                last.weight.copy_(0.5 * torch.randn(last.weight.shape, generator=g))
                last.bias.copy_(0.5 * torch.randn(last.bias.shape, generator=g))
    return net


def _numpy_gamma(x: np.ndarray, case: CaseBlock) -> np.ndarray:
    """The issue's formula, written out in float64 numpy."""
    axes = (0, *range(2, x.ndim))
    z = x.astype(np.float64).mean(axis=axes)
    z = (z - z.mean()) / np.sqrt(z.var() + 1e-5)  # numpy var is the biased one
    w = [m.weight.detach().double().numpy() for m in case.mlp if isinstance(m, torch.nn.Linear)]
    b = [m.bias.detach().double().numpy() for m in case.mlp if isinstance(m, torch.nn.Linear)]
    silu = lambda v: v / (1 + np.exp(-v))
    h = silu(w[0] @ z + b[0])
    h = silu(w[1] @ h + b[1])
    return 2.0 / (1.0 + np.exp(-(w[2] @ h + b[2])))


def _hooked(net: CaseNet, x: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference built without fx: forward hooks on the plain timm model scale each site's output in place
    of the graph rewrite (context mode when gamma is None)."""
    found = []

    def hook(i: int):
        def scale(_m, _inp, out):
            slot = net.layout[i]
            g = net.cases[i](out) if gamma is None else gamma[slot.offset : slot.offset + slot.length]
            found.append(g)
            return out * g.reshape(1, -1, *([1] * (out.dim() - 2)))

        return scale

    handles = [net.backbone.get_submodule(s.name).register_forward_hook(hook(i)) for i, s in enumerate(net.layout)]
    try:
        feats = net.backbone(x)
    finally:
        for h in handles:
            h.remove()
    return feats, torch.cat(found)


@pytest.mark.parametrize("family", sorted(RULE_CASES))
def test_block_and_parameter_counts(family: str) -> None:
    name, blocks = RULE_CASES[family]
    net = _net(name, random_case=False)
    assert len(net.cases) == blocks
    assert len({s.name for s in net.layout}) == blocks
    expected = sum(2 * c * case_hidden(c) + case_hidden(c) ** 2 + 2 * case_hidden(c) + c for c in (s.length for s in net.layout))
    assert sum(p.numel() for p in net.cases.parameters()) == expected
    assert all(case_param_count(s.length) == sum(p.numel() for p in case.parameters()) for s, case in zip(net.layout, net.cases))
    assert [s.offset for s in net.layout] == list(np.cumsum([0] + [s.length for s in net.layout[:-1]]))
    assert net.layout[-1].length == net.backbone.num_features  # the last block scales the pooled feature


def test_placement_sites_match_the_issue() -> None:
    eff = _net("efficientnet_b0", random_case=False)
    names = [s.name for s in eff.layout]
    assert names[0] == "bn1" and names[-2:] == ["bn2", "global_pool"]
    assert names[1] == "blocks.0.0.bn1" and names[2] == "blocks.1.0.bn2"  # depthwise norm-act, before SE
    res = _net("resnet18", random_case=False)
    names = [s.name for s in res.layout]
    assert names[:4] == ["layer1.0.act1", "layer1.0.act2", "layer1.1.act1", "layer1.1.act2"]
    assert names[-1] == "global_pool"


@pytest.mark.parametrize("name, blocks", [("efficientnet_b1", 26), ("resnet34", 33), ("resnet50", 33)])
def test_rules_cover_other_models_of_the_family(name: str, blocks: int) -> None:
    backbone = timm.create_model(name, num_classes=0).eval()
    assert len(CaseNet(backbone, family=family_of(name), probe_size=32).cases) == blocks


def test_unknown_family_is_refused() -> None:
    with pytest.raises(UnknownName, match="no CaSE placement rule for timm family 'vision_transformer'"):
        placement_for("case", "vision_transformer")


def test_block_matches_the_formula() -> None:
    torch.manual_seed(0)
    case = CaseBlock(96)
    assert case.mlp[0].out_features == 16 and CaseBlock(2048).mlp[0].out_features == 32
    assert torch.equal(case(torch.randn(3, 96, 5, 5)), torch.ones(96))  # zero-init last layer: identity
    with torch.no_grad():
        for m in case.mlp:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3)
                m.bias.normal_(0, 0.3)
    for shape in ((3, 96, 5, 7), (4, 96)):
        x = torch.randn(shape) * 2 + 1
        np.testing.assert_allclose(case(x).detach().double().numpy(), _numpy_gamma(x.numpy(), case), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_identity_at_init(name: str) -> None:
    net = _net(name, random_case=False)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        plain = net.backbone(x)
        feats, gamma = net(x)
    assert plain.abs().mean() > 1e-2  # realistic activations, not timm's ~1e-5 init
    assert torch.equal(gamma, torch.ones(net.gamma_size))
    torch.testing.assert_close(feats, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_modes_match_hooked_reference(name: str) -> None:
    net = _net(name)
    x = torch.randn(4, 3, 48, 48)
    y = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats, gamma = net(x)
        ref_feats, ref_gamma = _hooked(net, x, None)
        assert gamma.std() > 0.05  # the blocks really scale
        torch.testing.assert_close(gamma, ref_gamma, rtol=0, atol=1e-6)
        torch.testing.assert_close(feats, ref_feats, rtol=0, atol=1e-5)
        torch.testing.assert_close(net.query(x, gamma), feats, rtol=0, atol=1e-5)
        torch.testing.assert_close(net.query(y, gamma), _hooked(net, y, gamma)[0], rtol=0, atol=1e-5)
        assert (net.query(y, gamma) - net.backbone(y)).abs().max() > 1e-2  # γ changes query features


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_torch_stage_chain_is_exact(name: str) -> None:
    net = _net(name)
    x = torch.randn(7, 3, 40, 40)
    with torch.no_grad():
        feats, gamma = net(x)
    for size in (1, 3, 7):
        chunks = [x[i : i + size] for i in range(0, 7, size)]
        c_feats, c_gamma, means = run_stages_torch(net, chunks)
        torch.testing.assert_close(c_gamma, gamma, rtol=0, atol=1e-5)
        torch.testing.assert_close(c_feats, feats, rtol=0, atol=1e-5 * max(1.0, float(feats.abs().max())))
    assert means.shape == (net.gamma_size,)
    # the first site's mean is the plain channel mean of the unscaled stem activation
    stem = net.backbone.get_submodule(net.layout[0].name)
    with torch.no_grad():
        acts = []
        h = stem.register_forward_hook(lambda _m, _i, o: acts.append(o.mean(dim=(0, 2, 3))))
        net.backbone(x)
        h.remove()
    torch.testing.assert_close(means[: net.layout[0].length], acts[0], rtol=0, atol=1e-5)


def test_only_case_parameters_get_gradients() -> None:
    net = _net("resnet18")
    for p in net.cases.parameters():
        p.requires_grad_(True)
    x, y = torch.randn(4, 3, 32, 32), torch.randn(2, 3, 32, 32)
    feats, gamma = net.context_module()(x)
    (feats.square().mean() + net.query_module()(y, gamma).square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.cases.parameters())
    assert all(p.grad is None for p in net.backbone.parameters())
