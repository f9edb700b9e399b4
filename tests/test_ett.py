"""eTT (Xu et al., TMLR 2023) on a tiny timm ViT: prefix attention vs a hand-written attention, the attentive
prototype init vs a hand computation, the DRA fold, the exported task graph (ORT) vs the torch module,
one fitting step vs an independent reference loop, the MAC count vs a hand count."""
from __future__ import annotations

from dataclasses import replace

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsdeploy.errors import InvalidInput
from fsdeploy.modules.ett import ETTViT, PrefixRegulariser, PrefixTaskGraph, attentive_prototypes, prefix_attention, run_block

torch.set_num_threads(1)
DIM, HEADS, DEPTH, SIZE, PATCH = 32, 4, 2, 32, 8


def tiny_vit(seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
                            num_classes=0)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero biases, cls token and positions
    return vit.eval()


def support(seed: int = 1, k: int = 3, shots: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k * shots, 3, SIZE, SIZE, generator=g), torch.arange(k).repeat_interleave(shots)


def hand_attention(attn, x, pre_k, pre_v):
    """Multi-head attention from the qkv weights, keys/values = [prefix; tokens], per image and head in loops."""
    w, b = attn.qkv.weight, attn.qkv.bias
    out = torch.zeros(x.shape[0], x.shape[1], DIM)
    hd = DIM // HEADS
    for i in range(x.shape[0]):
        qkv = x[i] @ w.T + b
        q, k, v = qkv[:, :DIM], qkv[:, DIM:2 * DIM], qkv[:, 2 * DIM:]
        for h in range(HEADS):
            sl = slice(h * hd, (h + 1) * hd)
            keys = torch.cat([pre_k[h], k[:, sl]])
            vals = torch.cat([pre_v[h], v[:, sl]])
            logits = q[:, sl] @ keys.T / math.sqrt(hd)
            out[i, :, sl] = torch.exp(logits - logits.max(1, keepdim=True).values) @ vals / \
                torch.exp(logits - logits.max(1, keepdim=True).values).sum(1, keepdim=True)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_prefix_attention_equals_hand_attention_and_plain_block() -> None:
    vit = tiny_vit()
    x = torch.randn(2, 17, DIM)
    pre_k, pre_v = torch.randn(HEADS, 3, DIM // HEADS), torch.randn(HEADS, 3, DIM // HEADS)
    blk = vit.blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(prefix_attention(blk.attn, x, pre_k, pre_v), hand_attention(blk.attn, x, pre_k, pre_v),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run_block(blk, x), blk(x), rtol=1e-5, atol=1e-6)  # no prefix, no offsets: timm's block


def test_attentive_prototypes_equal_a_hand_computation() -> None:
    vit = tiny_vit()
    x, y = support()
    got = attentive_prototypes(vit, x, y, 3)
    hd = DIM // HEADS
    with torch.no_grad():
        emb = []
        for img in x:
            patches = vit.patch_embed(img[None])[0] + vit.pos_embed[0, 1:]  # input patch embeddings with positions
            tokens = torch.cat([vit.cls_token[0] + vit.pos_embed[0, :1], patches])[None]
            for blk in vit.blocks[:-1]:
                tokens = blk(tokens)
            last = vit.blocks[-1]
            h = last.norm1(tokens)[0]
            qkv = h @ last.attn.qkv.weight.T + last.attn.qkv.bias
            per_head = []
            for head in range(HEADS):
                sl = slice(head * hd, (head + 1) * hd)
                logits = qkv[0, sl] @ qkv[1:, DIM:2 * DIM][:, sl].T / math.sqrt(hd)  # CLS query vs patch keys
                a = torch.softmax(logits, 0)
                per_head.append((a[:, None] * patches).sum(0))
            emb.append(torch.stack(per_head).mean(0))
        emb = torch.stack(emb)
        ref = torch.stack([emb[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def fitted_like(seed: int = 0) -> ETTViT:
    vit = tiny_vit(seed)
    x, y = support()
    model = ETTViT(vit, attentive_prototypes(vit, x, y, 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.offsets.add_(0.1 * torch.randn_like(model.offsets))
        model.prefix_weight.add_(0.1 * torch.randn_like(model.prefix_weight))
    return model.eval()


def test_prefix_layout_and_folded_task_graph_equal_the_module() -> None:
    model = fitted_like()
    x, _ = support(seed=4)
    prefix = model.prefix_tokens()
    assert prefix.shape == (DEPTH, 2, HEADS, 3, DIM // HEADS)
    raw = model.control_trans(model.prefix_weight)  # (K, depth*2*D): block, key/value, head, channel
    torch.testing.assert_close(prefix[1, 1, 2, 0], raw[0].view(DEPTH, 2, HEADS, -1)[1, 1, 2])
    graph = PrefixTaskGraph.from_ett(model)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)
        blk = model.backbone.blocks[0]  # the fold changed only the copy's biases, not the frozen backbone
        assert not torch.equal(graph.backbone.blocks[0].attn.proj.bias, blk.attn.proj.bias)
        assert not torch.allclose(graph(x), model.backbone(x), atol=1e-3)


def test_exported_task_graph_on_ort_equals_torch(tmp_path) -> None:
    from fsdeploy.adapters.folded import export_bytes
    from fsdeploy.engines import open_engine

    model = fitted_like()
    graph = PrefixTaskGraph.from_ett(model)
    x, _ = support(seed=5)
    onnx = export_bytes(graph, x[:2], 17)
    with open_engine(onnx, "ort") as engine:
        got = engine.run({"images": x.numpy()})["features"]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_one_fitting_step_equals_a_reference_loop() -> None:
    from fsdeploy.train.ett import ett_loss, ett_optimiser

    torch.manual_seed(0)
    model = fitted_like()
    x, y = support()
    reg = PrefixRegulariser(model.prefix_weight.detach(), DIM, generator=torch.Generator().manual_seed(7))
    vartheta = torch.nn.Parameter(torch.eye(DIM) + 0.01 * torch.randn(DIM, DIM))
    # the reference: independent copies, loss written out from the paper/official code
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in
                  [("vartheta", vartheta), ("offsets", model.offsets), ("prefix", model.prefix_weight),
                   *[(f"ct{i}", p) for i, p in enumerate(model.control_trans.parameters())],
                   ("pw", reg.projector.weight), ("pb", reg.projector.bias)]}
    center = torch.zeros(1, 64)
    lr = 1e-2
    opt = ett_optimiser(model, vartheta, reg, lr)
    for p in model.task_parameters():
        p.requires_grad_(True)
    for _ in range(2):
        opt.zero_grad()
        ett_loss(model, vartheta, reg, x, y, 3).backward()
        opt.step()
    ref_opt = torch.optim.AdamW([{"params": [ref_params["vartheta"]], "lr": lr},
                                 {"params": [p for n, p in ref_params.items() if n != "vartheta"], "lr": lr / 2}], eps=1e-4)
    vit = model.backbone
    for _ in range(2):
        ref_opt.zero_grad()
        w1, b1, w2, b2 = (ref_params[f"ct{i}"] for i in range(4))
        ctrl = (torch.tanh(ref_params["prefix"] @ w1.T + b1) @ w2.T + b2).view(3, DEPTH, 2, HEADS, DIM // HEADS)
        tokens = vit._pos_embed(vit.patch_embed(x))
        for i, blk in enumerate(vit.blocks):
            pre_k, pre_v = ctrl[:, i, 0].permute(1, 0, 2), ctrl[:, i, 1].permute(1, 0, 2)
            tokens = tokens + hand_attention(blk.attn, blk.norm1(tokens), pre_k, pre_v) + ref_params["offsets"][i, 0]
            tokens = tokens + blk.mlp(blk.norm2(tokens)) + ref_params["offsets"][i, 1]
        feats = vit.norm(tokens)[:, 0] @ ref_params["vartheta"].T
        protos = torch.stack([feats[y == c].mean(0) for c in range(3)])
        logits = 10 * F.normalize(feats, dim=1) @ F.normalize(protos, dim=1).T
        proj = lambda t: F.normalize(t, dim=-1) @ ref_params["pw"].T + ref_params["pb"]  # noqa: E731
        teacher = torch.softmax((proj(reg.init_prefix) - center) / 0.04, -1).detach()
        pr = (-teacher * torch.log_softmax(proj(ref_params["prefix"]) / 0.1, -1)).sum(-1).mean()
        center = 0.9 * center + 0.1 * teacher.mean(0, keepdim=True)
        (F.cross_entropy(logits, y) + 0.1 * pr).backward()
        ref_opt.step()
    torch.testing.assert_close(vartheta.detach(), ref_params["vartheta"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.offsets.detach(), ref_params["offsets"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.prefix_weight.detach(), ref_params["prefix"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reg.center, center, rtol=1e-5, atol=1e-6)


def test_fit_ett_runs_and_refuses_cnns() -> None:
    from fsdeploy.train.ett import fit_ett

    vit = tiny_vit()
    x, y = support()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    res = fit_ett(vit, x, y.numpy(), steps=3, device="cpu")
    assert len(res.losses) == 3 and res.beta.shape == (DIM, DIM) and np.isfinite(res.losses).all()
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # the bundle's backbone is untouched
    with torch.no_grad():
        torch.testing.assert_close(res.task_graph()(x), res.model(x), rtol=1e-5, atol=1e-5)
    import timm

    with pytest.raises(InvalidInput, match="needs a timm VisionTransformer") as err:
        fit_ett(timm.create_model("resnet18", num_classes=0), x, y.numpy(), steps=1)
    assert "\n" not in str(err.value)


def test_adapt_macs_equal_a_hand_count() -> None:
    from fsdeploy.train.ett import ett_adapt_macs

    vit = tiny_vit()
    n, k, steps = 6, 3, 5
    patches, tokens = (SIZE // PATCH) ** 2, (SIZE // PATCH) ** 2 + 1
    hidden = 2 * DIM  # mlp_ratio 2
    linears = DEPTH * tokens * (DIM * 3 * DIM + DIM * DIM + DIM * hidden + hidden * DIM)  # qkv, proj, fc1, fc2
    patch = patches * 3 * PATCH * PATCH * DIM

    def attn(p):
        return DEPTH * 2 * tokens * (tokens + p) * DIM

    control = k * (DIM * DIM // 2 + DIM // 2 * DEPTH * 2 * DIM)
    step = n * (patch + 2 * linears + 3 * attn(k)) + 3 * control + 3 * n * DIM * DIM + 4 * k * DIM * 64
    assert ett_adapt_macs(vit, SIZE, n, k, steps) == n * (patch + linears + attn(0)) + steps * step


def test_cost_row_counts_the_real_vit_by_hand() -> None:
    """The cost table's ett row on the tiny ViT's own counts, against a hand count for K = 3, N = 6, S = 5."""
    from fsdeploy.bench.cost_inputs import measure_ett
    from fsdeploy.bench.costs import DEFAULT_METHODS, CountedMacs, TaskShape, adaptation_costs
    from fsdeploy.heads import make_head
    from fsdeploy.train.ett import ett_adapt_macs

    vit = tiny_vit()
    n, k, steps = 6, 3, 5
    tokens = (SIZE // PATCH) ** 2 + 1
    hidden = 2 * DIM
    linears = DEPTH * tokens * (DIM * 3 * DIM + DIM * DIM + DIM * hidden + hidden * DIM)
    patch = (SIZE // PATCH) ** 2 * 3 * PATCH * PATCH * DIM
    forward_k = patch + linears + DEPTH * 2 * tokens * (tokens + k) * DIM  # the task graph: K prefix tokens per block
    counts = measure_ett(vit, SIZE)
    assert measure_ett(__import__("timm").create_model("resnet18", num_classes=0), SIZE) is None
    (method,) = [replace(m, steps=steps) for m in DEFAULT_METHODS if m.key == "ett"]
    (row,) = adaptation_costs(CountedMacs(dim=DIM, backbone=0, ett=counts), TaskShape(k, n), [method])
    ncc = make_head("ncc")
    head = steps * 3 * (ncc.fit_macs(n, DIM, k) + ncc.predict_macs(n, DIM, k)) + ncc.fit_macs(n, DIM, k)
    assert row.head_macs == head
    assert row.adapt_macs == ett_adapt_macs(vit, SIZE, n, k, steps) + n * (forward_k + DIM * DIM) + head
    assert row.query_macs == forward_k + DIM * DIM + ncc.predict_macs(1, DIM, k)
    # stored per task: 2 folded biases per block, vartheta, K keys + values per block, the NCC prototypes
    assert row.params_adapted == DEPTH * 2 * DIM + DIM * DIM + k * DEPTH * 2 * DIM + ncc.n_params(DIM, k)


@pytest.fixture(scope="module")
def vit_bundle(tmp_path_factory):
    from fsdeploy.pipeline.export import export_bundle
    from tests.helpers import glyph_folder, make_checkpoint

    root = tmp_path_factory.mktemp("ett")
    ckpt = make_checkpoint("vit_tiny_patch16_224", root / "vit.safetensors", img_size=SIZE)
    bundle, _ = export_bundle("vit_tiny_patch16_224", root / "bundle", checkpoint=ckpt, img_size=SIZE, validate=False)
    glyph_folder(root / "glyphs", classes="ABCD", per_class=3, size=40)
    return root, bundle


def test_bench_accuracy_takes_ett_and_the_task_records_its_macs(vit_bundle) -> None:
    from typer.testing import CliRunner

    from fsdeploy.bench.render import read_rows
    from fsdeploy.cli import app
    from fsdeploy.runtime import adapt_task
    from fsdeploy.train.ett import ett_adapt_macs

    root, bundle = vit_bundle
    out = root / "acc.json"
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, [
        "bench", "accuracy", str(bundle.path), "--data", str(root / "glyphs"), "--ways", "2", "--shots", "1",
        "--queries", "1", "--episodes", "1", "--heads", "ett,ncc", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert [r["method"] for r in read_rows(out)] == ["eTT (attentive prefixes + DRA)", "NCC / ProtoNet"]
    task, _ = adapt_task(bundle, root / "glyphs", None, adapter="ett", steps=2)
    from fsdeploy.runtime.open import torch_graphs

    backbone = torch_graphs(bundle)["features"].module
    assert task.info["adapt_macs"] == ett_adapt_macs(backbone, SIZE, 12, 4, 2)
    assert task.task_state["ett/prefix"].shape == (12, 2, 3, 4, 64)  # vit_tiny: 12 blocks, 3 heads of 64, 4 classes
    from fsdeploy.bench.cost_inputs import bundle_costs, count_bundle
    from fsdeploy.bench.costs import TaskShape

    assert count_bundle(bundle).ett is not None  # the bundle counter fills eTT's counts on a ViT bundle
    rows = {r.method: r for r in bundle_costs(bundle, TaskShape(4, 12)).rows}
    assert rows["ett"].adapt_macs - rows["ett"].head_macs > ett_adapt_macs(backbone, SIZE, 12, 4, 40)


def test_cnn_bundles_are_refused_in_one_line(tmp_path) -> None:
    from fsdeploy.pipeline.export import export_bundle
    from fsdeploy.runtime import TaskAdapter
    from tests.helpers import make_checkpoint

    ckpt = make_checkpoint("resnet18", tmp_path / "r.safetensors", img_size=SIZE)
    bundle, _ = export_bundle("resnet18", tmp_path / "b", checkpoint=ckpt, img_size=SIZE, validate=False)
    with pytest.raises(InvalidInput, match="ett adapter is defined for vision_transformer") as err:
        TaskAdapter(bundle, adapter="ett")
    assert "\n" not in str(err.value)
