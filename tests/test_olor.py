"""OLOR as published (Lu et al., AAAI 2024): `OLORAdam` against a re-implementation of the official `AdamB.py`
step (written here from rainbow-xiao/OLOR-AAAI-2024), with the published setting back_level_max = 0.01 / lr,
back_level_min = 0, back_pow = 1; and its use on BN-affine fine-tuning."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fsdeploy.errors import InvalidInput
from fsdeploy.train.olor import OLORAdam, rollback_levels


class OfficialAdamB:
    """AdamB's arithmetic: D accumulates the applied updates; update = u (1 - lr b) + b D; p -= lr update."""

    def __init__(self, groups, lr, b_max, b_min=0.0, power=1.0, eps=1e-8, betas=(0.9, 0.999), level_eps=None):
        self.groups, self.lr, self.eps, self.betas = groups, lr, eps, betas
        self.level_eps = eps if level_eps is None else level_eps  # AdamB reuses Adam's eps inside the level
        self.b_max, self.b_min, self.power = b_max, b_min, power
        self.t = 0
        self.state = {id(p): {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "D": torch.zeros_like(p)}
                      for ps, _ in groups for p in ps}

    @torch.no_grad()
    def step(self, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for params, pretrained in self.groups:
            num_layers = len(params) - 1
            for i, p in enumerate(params):
                s = self.state[id(p)]
                s["m"] = b1 * s["m"] + (1 - b1) * p.grad
                s["v"] = b2 * s["v"] + (1 - b2) * p.grad * p.grad
                update = (s["m"] / bc1) / (s["v"].sqrt() / math.sqrt(bc2) + self.eps)
                if pretrained:
                    level = self.b_min + (1 - (i / num_layers + self.level_eps)) ** self.power * (self.b_max - self.b_min)
                    update = update * (1 - lr * level) + level * s["D"]
                    p -= lr * update
                    s["D"] -= lr * update
                else:
                    p -= lr * update


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_levels_decay_linearly_from_kappa_over_lr() -> None:
    lr = 1e-4
    levels = rollback_levels(5, 0.01 / lr)
    assert levels == pytest.approx([100.0, 75.0, 50.0, 25.0, 0.0])
    assert [lr * b for b in levels] == pytest.approx([0.01, 0.0075, 0.005, 0.0025, 0.0])  # λ at the base lr
    assert rollback_levels(1, 3.0) == [3.0]  # one tensor: no division by zero


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_steps_equal_official_adamb(schedule: str) -> None:
    """Backbone = first two Linears (4 tensors, OLOR), head = last Linear (plain Adam); 25 steps, λ_t = η_t b_i."""
    lr0, steps = 1e-2, 25
    ours, ref, ref_eps = _model(), _model(), _model()
    pre = lambda m: [p for layer in (m[0], m[2]) for p in layer.parameters()]
    head = lambda m: list(m[4].parameters())
    anchors = [p.detach().clone() for p in pre(ours)]
    opt = OLORAdam(pre(ours), head(ours), lr=lr0)
    # exact: the official arithmetic with 1 - i/L as the level; close: with its eps inside the level too
    official = OfficialAdamB([(pre(ref), True), (head(ref), False)], lr0, b_max=0.01 / lr0, level_eps=0.0)
    official_eps = OfficialAdamB([(pre(ref_eps), True), (head(ref_eps), False)], lr0, b_max=0.01 / lr0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    for t in range(steps):
        lr = lr0 if schedule == "constant" else 0.5 * lr0 * (1 + math.cos(math.pi * t / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        for model in (ours, ref, ref_eps):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        official.step(lr)
        official_eps.step(lr)
        for a, b, c in zip(ours.parameters(), ref.parameters(), ref_eps.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
            torch.testing.assert_close(a, c, rtol=0, atol=1e-9)
    moved = [float((p.detach() - a).abs().max()) for p, a in zip(pre(ours), anchors)]
    assert max(moved) > 1e-3  # it trained
    # without the rollback, the same steps move the first tensor further from the pretrained weights
    plain = _model()
    adam = torch.optim.Adam(plain.parameters(), lr=lr0)
    for t in range(steps):
        lr = lr0 if schedule == "constant" else 0.5 * lr0 * (1 + math.cos(math.pi * t / steps))
        for group in adam.param_groups:
            group["lr"] = lr
        plain.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        adam.step()
    assert float((plain[0].weight.detach() - anchors[0]).norm()) > float((ours[0].weight.detach() - anchors[0]).norm())


def test_head_tensors_get_plain_adam() -> None:
    ours, ref = _model(), _model()
    opt = OLORAdam([], list(ours.parameters()), lr=1e-2)
    adam = torch.optim.Adam(ref.parameters(), lr=1e-2)  # weight_decay 0, as OLOR's
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 3
    for _ in range(5):
        for model in (ours, ref):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        adam.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bn_affine_with_olor(tmp_path) -> None:
    """BN-affine's OLOR option: the BN tensors (shallow first) are rolled back each step towards the pretrained ones."""
    from fsdeploy.backbones import create_backbone
    from fsdeploy.train.tsa import fit_bn_affine
    from tests.helpers import realistic_

    backbone, _ = create_backbone("resnet18", img_size=32)
    realistic_(backbone)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), np.arange(6) % 3
    res = fit_bn_affine(backbone, images, labels, steps=3, optimizer="olor", device="cpu")
    assert res.optimizer == "olor" and res.lr == 1e-3 and res.losses[-1] < res.losses[0]
    before, after = backbone.state_dict(), res.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in res.changed_keys)
    with pytest.raises(InvalidInput, match="unknown BN-affine optimizer 'sgd'"):
        fit_bn_affine(backbone, images, labels, steps=1, optimizer="sgd", device="cpu")


def test_heads_refuse_the_old_name_with_a_pointer() -> None:
    from fsdeploy.heads import make_head

    with pytest.raises(InvalidInput, match="now called 'rollback'.*--optimizer olor"):
        make_head("linear", optimizer="olor")
