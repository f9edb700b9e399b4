"""The CaSE scale fusion (fsdeploy.modules.scale_fusion): the deploy query graph computes the plain query
graph's function with fewer full-size multiplies, leaves models without SE alone, and the stage chain cut from
it carries each fused site's mean instead of recomputing it."""
from __future__ import annotations

import operator

import pytest
import torch

from fsdeploy.modules.case import apply_gamma
from fsdeploy.modules.scale_fusion import fuse_channel_scales, site_mean
from tests.test_case_blocks import _hooked, _net


def _large_multiplies(gm: torch.fx.GraphModule, *inputs: torch.Tensor) -> int:
    """Multiplies (apply_gamma or `*`) whose output has spatial size > 1, counted by running the graph."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*inputs)
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (apply_gamma, operator.mul):
            shape = n.meta["tensor_meta"].shape
            count += len(shape) == 4 and shape[2] * shape[3] > 1
    return count


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_deploy_query_equals_plain_query(name: str) -> None:
    net = _net(name)
    x, y = torch.randn(4, 3, 64, 64), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        _, gamma = net(x)
        plain = net.query_module()(y, gamma)
        fused = net.deploy_query_module()(y, gamma)
        hooked = _hooked(net, y, gamma)[0]  # independent of both fx rewrites
    scale = float(plain.abs().max())
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_deploy_context_equals_plain_context(name: str) -> None:
    net = _net(name)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        feats, gamma = net.context_module()(x)
        d_feats, d_gamma = net.deploy_context_module()(x)
        h_feats, h_gamma = _hooked(net, x, None)
    assert float(gamma.std()) > 0.05  # the blocks really scale
    torch.testing.assert_close(d_gamma, gamma, rtol=0, atol=1e-6)
    torch.testing.assert_close(d_gamma, h_gamma, rtol=0, atol=1e-6)
    scale = float(feats.abs().max())
    torch.testing.assert_close(d_feats, feats, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(d_feats, h_feats, rtol=0, atol=1e-5 * scale)


def test_efficientnet_loses_one_large_multiply_per_squeeze_excitation() -> None:
    net = _net("efficientnet_b0")
    x, gamma = torch.randn(1, 3, 64, 64), torch.ones(net.gamma_size)
    se_blocks = sum(1 for name, _ in net.backbone.named_modules() if name.endswith(".se"))
    assert se_blocks == 16
    with torch.no_grad():
        before = _large_multiplies(net.query_module(), x, gamma)
        after = _large_multiplies(net.deploy_query_module(), x, gamma)
        context_before = _large_multiplies(net.context_module(), x)
        context_after = _large_multiplies(net.deploy_context_module(), x)
    assert before - after == se_blocks
    assert context_before - context_after == se_blocks


def test_resnet_graph_is_left_alone() -> None:
    net = _net("resnet18")
    x, gamma = torch.randn(1, 3, 64, 64), torch.ones(net.gamma_size)
    with torch.no_grad():
        assert _large_multiplies(net.deploy_query_module(), x, gamma) == _large_multiplies(net.query_module(), x, gamma)
    _, sites, _ = net._deploy_rewrite(context=False)
    assert not any(site_mean(s) is not None for s in sites)


def test_fused_stages_carry_the_site_mean() -> None:
    """Each stage after an SE-followed site takes that site's (N, C, 1, 1) mean as state; pooled is that mean."""
    net = _net("efficientnet_b0")
    stages = net.stages()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = stages[0].module(x)
        state = out[1:]
        for k, stage in enumerate(stages[1:-1], start=1):
            out = stage.module(*state, torch.ones(net.gamma_size))
            pooled, *state = out
            small = [t for t in state if t.dim() == 4 and t.shape[2:] == (1, 1)]
            if 1 <= k <= 16:  # sites 1..16 are the blocks' depthwise activations, each followed by SE
                assert len(small) == 1 and small[0].flatten(1).shape == pooled.shape
                torch.testing.assert_close(small[0].flatten(1), pooled, rtol=0, atol=0)


def test_probe_does_not_touch_batchnorm_statistics() -> None:
    net = _net("efficientnet_b0").train()
    before = {k: v.clone() for k, v in net.backbone.state_dict().items() if "running" in k}
    gm, _, _ = net._rewrite(context=False)
    fuse_channel_scales(gm, torch.randn(2, 3, 32, 32), torch.ones(net.gamma_size))
    after = {k: v for k, v in net.backbone.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(m.training for m in net.backbone.modules())


def test_site_mean_only_marks_fused_sites() -> None:
    net = _net("efficientnet_b0")
    _, sites, _ = net._deploy_rewrite(context=False)
    marked = [site_mean(s) is not None for s in sites]
    assert marked == [False] + [True] * 16 + [False, False]
