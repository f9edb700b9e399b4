"""CaSE meta-training as the official UpperCaSE code does it (mpatacchiola/contextual-squeeze-and-excitation):
the from-scratch init of `EfficientNet.__init__` + `CaSE.reset_parameters`, and the outer step of
`UpperCaSE.learn`, each against a small re-implementation written here from that code."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsdeploy.backbones import read_checkpoint
from fsdeploy.data.episodes import sample_episode
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.data.images import load_batch
from fsdeploy.errors import InvalidInput
from fsdeploy.backbones import BuildRequest
from fsdeploy.modules.case import CaseBlock
from fsdeploy.modules.case_checkpoint import build_casenet
from fsdeploy.train.metatrain import HeadRecipe, fit_head_torch, metatrain, upstream_task_backward
from tests.helpers import glyph_folder, make_checkpoint

SIZE = 32


def official_case_init_(blocks, seed: int) -> None:
    """The official start: every Linear U(-1/sqrt(out), 1/sqrt(out)) with zero bias, then the last one zeroed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks:
            lin1, lin2, lin3 = block.mlp[0], block.mlp[2], block.mlp[4]
            for lin in (lin1, lin2):
                r = 1.0 / math.sqrt(lin.out_features)
                lin.weight.uniform_(-r, r, generator=gen)
                lin.bias.zero_()
            lin3.weight.zero_()
            lin3.bias.zero_()


def official_adaptive_hooks(net):
    """Forward hooks making the plain backbone run CaSE in the official adaptive mode (γ from the batch itself)."""

    def hook_for(block):
        lin1, lin2, lin3 = block.mlp[0], block.mlp[2], block.mlp[4]

        def hook(_module, _inputs, out):
            g = out.mean(dim=[0, *range(2, out.dim())])  # a site after global pooling is (N, C)
            g = (g - g.mean()) / torch.sqrt(torch.var(g, unbiased=False) + 1e-5)
            g = F.silu(F.linear(g.unsqueeze(0), lin1.weight, lin1.bias))
            g = F.silu(F.linear(g, lin2.weight, lin2.bias))
            g = torch.sigmoid(F.linear(g, lin3.weight, lin3.bias)) * 2.0
            return out * g.reshape(1, -1, *([1] * (out.dim() - 2)))

        return hook

    return [net.backbone.get_submodule(s.name).register_forward_hook(hook_for(b)) for s, b in zip(net.layout, net.cases)]


def test_init_is_the_official_one() -> None:
    block = CaseBlock(256)
    block.reset_for_metatraining_(torch.Generator().manual_seed(3))
    ref = CaseBlock(256)
    official_case_init_([ref], 3)
    for (k, a), (_, b) in zip(block.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    lin1 = block.mlp[0].weight.detach()
    assert float(lin1.abs().max()) <= 1 / math.sqrt(16) and float(lin1.abs().max()) > 0.9 / math.sqrt(16)
    assert float(lin1.abs().max()) > 1 / math.sqrt(256)  # not PyTorch's default bound 1/sqrt(in)
    assert torch.count_nonzero(block.mlp[4].weight) == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("upstream")
    data = glyph_folder(tmp / "glyphs", classes="ABCDEF", per_class=4, size=SIZE)
    (data / "splits.json").write_text(json.dumps({"base": ["A", "B", "C", "D"], "novel": ["E", "F"]}))
    return tmp, data, make_checkpoint("resnet18", tmp / "backbone.safetensors", img_size=SIZE)


def test_task_backward_equals_the_official_learn_step(corpus) -> None:
    """Several 128-less batches (batch 5 over 12 images: 2 batches), gradients summed over them."""
    _, _, ckpt = corpus
    net, _ = build_casenet(BuildRequest("resnet18", checkpoint=ckpt, img_size=SIZE))
    official_case_init_(net.cases, 0)
    with torch.no_grad():
        for block in net.cases:  # a non-identity start, so γ differs between batches
            block.mlp[4].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    ctx, tgt = torch.randn(6, 3, SIZE, SIZE, generator=g), torch.randn(6, 3, SIZE, SIZE, generator=g)
    cy, ty = torch.arange(6) % 3, torch.arange(6) % 3
    recipe = HeadRecipe(iters=10)
    loss, _ = upstream_task_backward(net, ctx, cy, tgt, ty, 3, np.random.default_rng(5), recipe, batch=5)
    ours = [p.grad.clone() for p in net.cases.parameters()]
    net.cases.zero_grad(set_to_none=True)

    rng = np.random.default_rng(5)
    handles = official_adaptive_hooks(net)
    try:
        with torch.no_grad():
            emb = net.backbone(ctx)
        w, b = fit_head_torch(emb, cy, 3, rng, recipe)
        images, labels = torch.cat([ctx, tgt]), torch.cat([cy, ty])
        losses = []
        for _ in range(max(1, 12 // 5)):
            idx = torch.from_numpy(rng.integers(0, 12, size=5))
            out = F.nll_loss(torch.log_softmax(net.backbone(images[idx]) @ w.T + b, 1), labels[idx])
            out.backward()
            losses.append(float(out.detach()))
    finally:
        for h in handles:
            h.remove()
    assert len(losses) == 2 and loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    for a, p in zip(ours, net.cases.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert any(float(a.abs().max()) > 0 for a in ours)


def test_metatrain_equals_the_official_loop(corpus) -> None:
    """Five tasks, a step every 2 (after t = 2 and 4, summed gradients), lr linspace over tasks, from scratch."""
    tmp, data, ckpt = corpus
    tasks, ways, shots, queries, acc, seed = 5, 3, 2, 2, 2, 4
    recipe = HeadRecipe(iters=15)
    stats = []
    out = metatrain(
        "resnet18", data, tmp / "case.safetensors", checkpoint=ckpt, split="base", tasks=tasks, ways=ways, shots=shots,
        queries=queries, accumulate=acc, head=recipe, device="cpu", seed=seed, progress=stats.append,
    )
    assert [s.stepped for s in stats] == [False, False, True, False, True]
    state, meta = read_checkpoint(out)
    assert meta["metatrain"]["outer"] == "upstream" and meta["metatrain"]["init"] == "upstream"

    net, pre = build_casenet(BuildRequest("resnet18", checkpoint=ckpt, img_size=SIZE))
    official_case_init_(net.cases, seed)
    files = scan_image_folder(data, classes=["A", "B", "C", "D"])
    imgs = torch.from_numpy(load_batch(files.paths, pre))
    params = list(net.cases.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    lrs = np.linspace(1e-3, 1e-5, tasks)
    rng = np.random.default_rng(seed)
    handles = official_adaptive_hooks(net)
    try:
        for t in range(tasks):
            ep = sample_episode(files.labels, ways, shots, queries, rng)
            ctx, cy = imgs[ep.support], torch.from_numpy(ep.support_labels)
            with torch.no_grad():
                emb = net.backbone(ctx)
            w, b = fit_head_torch(emb, cy, ways, rng, recipe)
            images = torch.cat([ctx, imgs[ep.query]])
            labels = torch.cat([cy, torch.from_numpy(ep.query_labels)])
            n = images.shape[0]
            for _ in range(max(1, n // 128)):
                idx = torch.from_numpy(rng.integers(0, n, size=128))
                F.nll_loss(torch.log_softmax(net.backbone(images[idx]) @ w.T + b, 1), labels[idx]).backward()
            if t % acc == 0 and t > 0:
                for group in opt.param_groups:
                    group["lr"] = lrs[t]
                opt.step()
                opt.zero_grad()
    finally:
        for h in handles:
            h.remove()
    moved = 0
    for k, v in net.cases.state_dict().items():
        torch.testing.assert_close(state["cases." + k], v, rtol=1e-4, atol=2e-6)
        moved += int(k.endswith("mlp.4.weight") and float(v.abs().max()) > 1e-4)
    assert moved > 0


def test_context_gamma_option_and_bad_name(corpus) -> None:
    tmp, data, ckpt = corpus
    stats = []
    metatrain(
        "resnet18", data, tmp / "cg.safetensors", checkpoint=ckpt, tasks=3, ways=2, shots=1, queries=1, accumulate=2,
        outer="context-gamma", head=HeadRecipe(iters=5), device="cpu", progress=stats.append,
    )
    assert [s.stepped for s in stats] == [False, True, True]
    with pytest.raises(InvalidInput, match="unknown outer step 'sum'"):
        metatrain("resnet18", data, tmp / "x.safetensors", checkpoint=ckpt, tasks=1, outer="sum")
