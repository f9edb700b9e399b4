"""TOAST: equals an independent re-implementation of the released module (bfshi/TOAST vit_top_down.py,
vit_models.py) with real biases, the released training recipe, value-term maths, ONNX parity, MAC count,
tuning touches only the top-down path, format-1 checkpoints still load."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

from fsdeploy.backbones import create_backbone, save_checkpoint
from fsdeploy.errors import InvalidInput
from fsdeploy.modules.toast import TopDownViT, attend_with_value_term, count_toast_parameters, toast_macs, vit_macs
from fsdeploy.modules.toast_checkpoint import load_toast, toast_metadata
from fsdeploy.train.toast import make_head, make_optimizer, pretune_toast, random_crop_flip, tune_toast

MODEL = "vit_tiny_patch16_224"
SIZE = 32
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def _tiny_vit():
    torch.manual_seed(0)
    return create_backbone(MODEL, img_size=SIZE)[0]


def _gap_vit():
    """A small avg-pooled ViT with register tokens and qk-norm: the other pooling/prefix path."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    model = VisionTransformer(
        img_size=SIZE, patch_size=8, embed_dim=64, depth=3, num_heads=4, global_pool="avg", reg_tokens=2,
        qk_norm=True, num_classes=0,
    )
    return model.eval().requires_grad_(False)


def _with_fused(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


def _randomise_top_down(module: TopDownViT, seed: int, std: float = 0.05) -> TopDownViT:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("backbone.") and p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of rendered letters, 6 jittered images each, 40 px."""
    root = tmp_path_factory.mktemp("glyphs")
    rng = np.random.default_rng(0)
    font = ImageFont.truetype(FONT, 26)
    for letter in "AOX":
        (root / letter).mkdir()
        for i in range(6):
            img = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(180, 255, 3)))
            dx, dy = rng.integers(-4, 5, 2)
            ImageDraw.Draw(img).text((10 + dx, 5 + dy), letter, font=font, fill=(0, 0, 0))
            img.rotate(float(rng.uniform(-15, 15)), fillcolor=(255, 255, 255)).save(root / letter / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def backbone_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, pre = create_backbone(MODEL, img_size=SIZE)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return save_checkpoint(model, tmp_path_factory.mktemp("bb") / "vit.safetensors", name=MODEL, preprocess=pre)


@pytest.mark.parametrize("make", [_tiny_vit, _gap_vit], ids=["cls-token", "avg-pool+registers+qknorm"])
def test_zero_value_maps_give_the_plain_vit(make) -> None:
    """The named deviation value_path="learned" + decoder_init="identity": the untuned network is the plain ViT."""
    backbone = make()
    module = TopDownViT(backbone, value_path="learned", decoder_init="identity", generator=torch.Generator().manual_seed(0)).eval()
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        toast = module(images)
        plain_manual = _with_fused(backbone, False)(images)
        plain_fused = _with_fused(backbone, True)(images)
    assert torch.equal(toast, plain_manual)  # same op order as timm's written-out attention: bit-identical
    torch.testing.assert_close(toast, plain_fused, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        steered = _randomise_top_down(module, seed=4)(images)
    assert (steered - plain_fused).abs().max() > 1e-3  # and the value path does change the features


def test_released_value_path_adds_the_value_bias_even_with_zero_decoders() -> None:
    """qkv(td)[2] = W_v td + b_v: with td = 0 every block's values get exactly b_v added (not the plain ViT)."""
    backbone = _real_biases(_tiny_vit())
    module = TopDownViT(backbone, decoder_init="identity").eval()  # value maps zero -> td = 0
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        terms = module.top_down(module.run_blocks(module.embed(images)))
        for blk, term in zip(backbone.blocks, terms):
            torch.testing.assert_close(term, blk.attn.qkv.bias[384:].expand_as(term), atol=0, rtol=0)
        assert (module(images) - _with_fused(backbone, False)(images)).abs().max() > 1e-3


def test_value_term_is_added_to_values_only() -> None:
    attn = _tiny_vit().blocks[0].attn
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 192, generator=gen)
    term = torch.randn(2, 5, 192, generator=gen)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    v = v + term.reshape(2, 5, 3, 64).transpose(1, 2)
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 192))
    with torch.no_grad():
        torch.testing.assert_close(attend_with_value_term(attn, x, term), expected, atol=1e-5, rtol=1e-5)


def test_feedback_runs_from_the_top_block_down() -> None:
    module = _randomise_top_down(TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0)), seed=6)
    tokens = torch.randn(2, 5, 192, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = module.top_down(tokens)
        module.feedback[5].weight.mul_(2.0)
        after = module.top_down(tokens)
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    assert changed == [i <= 5 for i in range(12)]  # block 5's feedback layer feeds blocks 5..0, not 6..11


def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    module = _randomise_top_down(TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0)), seed=8).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        module, (torch.zeros(2, 3, SIZE, SIZE),), buffer, opset_version=17, dynamo=False,
        input_names=["images"], output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
    )
    ops = {n.op_type for n in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert "LayerNormalization" in ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        images = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = module(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == (batch, 192)
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize(
    ("make", "lite_rank"), [(_tiny_vit, 0), (_tiny_vit, 4), (_gap_vit, 0)], ids=["tiny", "tiny-lite4", "gap-18-tokens"]
)
def test_macs_match_an_independent_count(make, lite_rank: int) -> None:
    backbone = _with_fused(make(), False)
    module = TopDownViT(backbone, lite_rank=lite_rank, generator=torch.Generator().manual_seed(0)).merge_lora().eval()
    images = torch.randn(1, 3, SIZE, SIZE)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(images)
    counted = counter.get_total_flops() // 2
    assert abs(toast_macs(module, SIZE) - counted) <= 0.01 * counted
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(images)
    plain = counter.get_total_flops() // 2
    assert abs(vit_macs(backbone, SIZE) - plain) <= 0.01 * plain
    assert 2 * plain < toast_macs(module, SIZE) < 2.5 * plain  # two passes plus a small feedback path


def test_lite_parameter_count_and_merge() -> None:
    module = TopDownViT(_tiny_vit(), lite_rank=4, generator=torch.Generator().manual_seed(0))
    dim, depth, rank = 192, 12, 4
    hand = dim + dim * dim + depth * 2 * (rank * dim + dim * rank)  # xi, selector, LoRA A and B per feedback/value map
    trainable = sum(p.numel() for p in module.toast_parameters())
    assert trainable == hand == count_toast_parameters(dim, depth, dim, lite_rank=rank)
    assert module.selector.weight.requires_grad  # released toast-lite: prompt and top_down_transform trained
    full = TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0))
    assert not full.selector.weight.requires_grad  # released toast: only decoders, prompt (and head) trained
    assert sum(p.numel() for p in full.toast_parameters()) == dim + depth * 2 * dim * dim == count_toast_parameters(dim, depth, dim)
    forced = TopDownViT(_tiny_vit(), train_selector=True, generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in forced.toast_parameters()) - sum(p.numel() for p in full.toast_parameters()) == dim * dim
    # ViT-S: the frozen selector is the 147,456 parameters issue #19 counted
    assert count_toast_parameters(384, 12, 384, train_selector=True) - count_toast_parameters(384, 12, 384) == 147_456
    assert all(not p.requires_grad for p in module.backbone.parameters())
    with torch.no_grad():
        for m in (*module.feedback, *module.to_value):
            m.lora_b.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(9))
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        unmerged = module.eval()(images)
        merged = module.merge_lora()(images)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_reconstruction_loss_trains_only_the_feedback_layers() -> None:
    module = TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0))
    _, streams = module.forward_with_streams(torch.randn(2, 3, SIZE, SIZE), keep_streams=True)
    assert len(streams) == 12
    module.reconstruction_loss(streams).backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert (p.grad is not None and p.grad.abs().sum() > 0) == name.startswith("feedback."), name


def test_tuning_changes_only_top_down_and_reduces_loss(glyph_folder: Path, backbone_ckpt: Path, tmp_path: Path) -> None:
    reference = create_backbone(MODEL, checkpoint=backbone_ckpt, img_size=SIZE)[0].state_dict()
    result = tune_toast(
        MODEL, glyph_folder, checkpoint=backbone_ckpt, img_size=SIZE, epochs=8, warmup_epochs=1, batch_size=9,
        recon_weight=0.1, flip=False, out=tmp_path / "toast.safetensors",
    )
    after = result.module.backbone.state_dict()
    assert after.keys() == reference.keys()
    assert all(torch.equal(after[k], reference[k]) for k in reference)
    assert len(result.step_losses) == 16
    assert result.final_loss < result.initial_loss
    init = TopDownViT(create_backbone(MODEL, checkpoint=backbone_ckpt, img_size=SIZE)[0], generator=torch.Generator().manual_seed(0))
    start = init.toast_state_dict()
    for name, value in result.module.toast_state_dict().items():
        assert torch.equal(value, start[name]) == (name == "selector.weight"), f"{name}: moved only if tuned"

    meta = toast_metadata(result.checkpoint)
    assert (meta["model"], meta["img_size"], meta["lite_rank"], meta["classes"]) == (MODEL, SIZE, 0, ["A", "O", "X"])
    loaded = load_toast(None, result.checkpoint, backbone_checkpoint=backbone_ckpt)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), result.module.eval()(images), atol=1e-6, rtol=1e-6)
    with pytest.raises(InvalidInput, match="tuned on other backbone weights"):
        load_toast(MODEL, result.checkpoint)  # timm init, not the tuned-on weights
    with pytest.raises(InvalidInput, match="tuned on vit_tiny_patch16_224, not"):
        load_toast("vit_small_patch16_224", result.checkpoint)


def test_lite_tuning_writes_a_loadable_checkpoint_via_cli(glyph_folder: Path, backbone_ckpt: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from fsdeploy.train.toast_cli import register_toast

    app = typer.Typer()
    register_toast(app)
    app.command("noop")(lambda: None)  # a second command keeps Typer from collapsing to a single-command app
    out = tmp_path / "lite.safetensors"
    run = CliRunner().invoke(app, [
        "toast-tune", MODEL, "--data", str(glyph_folder), "--out", str(out), "--checkpoint", str(backbone_ckpt),
        "--img-size", str(SIZE), "--epochs", "2", "--warmup-epochs", "1", "--batch", "9", "--lite-rank", "2",
    ])
    assert run.exit_code == 0, run.output
    assert "train accuracy" in run.output
    module = load_toast(MODEL, out, backbone_checkpoint=backbone_ckpt)
    assert module.lite_rank == 0 and toast_metadata(out)["lite_rank"] == 2  # merged on load


def test_pretune_then_tune_via_cli_starts_from_the_pretuned_path(glyph_folder: Path, backbone_ckpt: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner
    from safetensors.torch import load_file

    from fsdeploy.train.toast_cli import register_toast

    app = typer.Typer()
    register_toast(app)
    pre, out = tmp_path / "pre.safetensors", tmp_path / "tuned.safetensors"
    common = ["--data", str(glyph_folder), "--checkpoint", str(backbone_ckpt), "--img-size", str(SIZE), "--batch", "18", "--no-flip"]
    run = CliRunner().invoke(app, ["toast-pretune", MODEL, *common, "--out", str(pre), "--epochs", "2", "--warmup-epochs", "1"])
    assert run.exit_code == 0, run.output
    meta = toast_metadata(pre)
    assert (meta["stage"], meta["recon_weight"], meta["optimizer"], meta["flip"]) == ("pretune", 0.1, "sgd", False)
    # epochs=1: the released schedule runs epoch 0 at lr 0, so the tuned tensors are the pre-tuned ones
    run = CliRunner().invoke(app, ["toast-tune", MODEL, *common, "--out", str(out), "--epochs", "1", "--pretuned", str(pre)])
    assert run.exit_code == 0, run.output
    pre_state, tuned_state = load_file(str(pre)), load_file(str(out))
    assert pre_state.keys() == tuned_state.keys()
    assert all(torch.equal(pre_state[k], tuned_state[k]) for k in pre_state)
    fresh = TopDownViT(create_backbone(MODEL, checkpoint=backbone_ckpt, img_size=SIZE)[0], generator=torch.Generator().manual_seed(0))
    assert not torch.equal(fresh.feedback[0].weight, pre_state["feedback.0.weight"])  # pre-tuning moved the decoders
    run = CliRunner().invoke(app, ["toast-tune", MODEL, *common, "--out", str(out), "--epochs", "1", "--pretuned", str(out)])
    assert run.exit_code != 0 and "is not a pre-tuned TOAST checkpoint" in str(run.exception)


def test_non_vit_backbones_are_rejected() -> None:
    resnet = create_backbone("resnet18", img_size=SIZE)[0]
    with pytest.raises(InvalidInput, match="needs a timm VisionTransformer"):
        TopDownViT(resnet)


def test_bad_tuning_options_are_reported(glyph_folder: Path) -> None:
    with pytest.raises(InvalidInput, match="bad tuning options"):
        tune_toast(MODEL, glyph_folder, img_size=SIZE, lr=-1.0)


# ---------------------------------------------------------------------------------------------------------
# An independent re-implementation of the released module, written from bfshi/TOAST
# visual_classification/src/models/vit/vit_top_down.py (Attention/Block/Decode_Block/VisionTransformer.forward,
# var_loss) and vit_models.py (toast / toast-lite freezing, loralib r=4, alpha 1), on raw tensors. It reads the
# timm backbone's weights but none of fsdeploy's TOAST code.
# ---------------------------------------------------------------------------------------------------------


def _real_biases(model: torch.nn.Module, seed: int = 11) -> torch.nn.Module:
    """Every backbone tensor (qkv/proj/mlp biases, norms, cls token, pos embed) gets O(0.1) noise: real biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.02))
    return model


def _ref_attention(attn, x, td):
    B, N, C = x.shape
    H = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if td is not None:
        qkv_td = F.linear(td, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        v = v + qkv_td[2]
    a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)
    return F.linear((a @ v).transpose(1, 2).reshape(B, N, C), attn.proj.weight, attn.proj.bias)


def _ref_block(blk, x, td):
    ln = lambda n, t: F.layer_norm(t, n.normalized_shape, n.weight, n.bias, n.eps)  # noqa: E731
    x = x + _ref_attention(blk.attn, ln(blk.norm1, x), td)
    hidden = F.gelu(F.linear(ln(blk.norm2, x), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    return x + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def _ref_forward_features(vit, images, td=None):
    x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=vit.patch_embed.proj.stride)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + vit.pos_embed
    in_var, out_var = [], []
    for i, blk in enumerate(vit.blocks):
        in_var.append(x)
        x = _ref_block(blk, x, None if td is None else td[i])
        out_var.append(x)
    x = F.layer_norm(x, vit.norm.normalized_shape, vit.norm.weight, vit.norm.bias, vit.norm.eps)
    return x, in_var, out_var


def _ref_lora(x, weight, lora_a, lora_b, r, alpha=1.0):
    """loralib.Linear.forward (bias=False): x W^T + (x A^T B^T) * alpha / r."""
    return F.linear(x, weight) + (x @ lora_a.transpose(0, 1) @ lora_b.transpose(0, 1)) * (alpha / r)


def _ref_toast(vit, prompt, top_down_transform, decoders, images):
    """Released VisionTransformer.forward (token pooling) + var_loss; decoders[l] = (linear, linear2) callables."""
    x, _, _ = _ref_forward_features(vit, images)
    cos_sim = F.normalize(x, dim=-1) @ F.normalize(prompt[None, ..., None], dim=1)
    x = x * cos_sim.clamp(0, 1)
    x = x @ top_down_transform
    td = []
    for depth in range(len(decoders) - 1, -1, -1):
        x = decoders[depth][0](x)
        td = [decoders[depth][1](x)] + td
    x, in_var, out_var = _ref_forward_features(vit, images, td)
    recon = [F.mse_loss(decoders[d][0](out_var[d].detach()), in_var[d].detach()) for d in range(len(decoders) - 1, -1, -1)]
    return x[:, 0], 0.1 * sum(recon)


def _decoders_of(module: TopDownViT):
    return [(lambda t, w=f.weight: F.linear(t, w), lambda t, w=v.weight: F.linear(t, w)) for f, v in zip(module.feedback, module.to_value)]


def test_module_equals_the_released_toast_with_real_biases() -> None:
    backbone = _real_biases(_tiny_vit())
    assert backbone.blocks[0].attn.qkv.bias[384:].abs().mean() > 0.05  # the value bias is really there
    module = _randomise_top_down(TopDownViT(backbone, generator=torch.Generator().manual_seed(0)), seed=12).eval()
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want, want_var = _ref_toast(backbone, module.task_vector, module.selector.weight.T, _decoders_of(module), images)
        got, streams = module.forward_with_streams(images, keep_streams=True)
        got_var = 0.1 * module.reconstruction_loss(streams)  # the released weight times the summed loss
    assert want.abs().mean() > 0.1 and want_var > 1e-3
    assert (got - want).abs().max() <= 1e-5
    assert abs(float(got_var - want_var)) <= 1e-5 * max(1.0, float(want_var))
    # the check can fail: fsdeploy's former value path (no value bias, no W_v) with the same weights is far off
    legacy = TopDownViT(backbone, value_path="learned", generator=torch.Generator().manual_seed(0)).eval()
    legacy.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert (legacy(images) - want).abs().max() > 1e-2


def test_lite_equals_the_released_toast_lite_and_scales_by_alpha_over_r() -> None:
    backbone = _real_biases(_tiny_vit())
    rank = 4
    module = TopDownViT(backbone, lite_rank=rank, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for m in (*module.feedback, *module.to_value):
            m.lora_b.normal_(0.0, 0.05, generator=gen)
    module.eval()
    # released toast-lite: only LoRA factors, prompt and top_down_transform train
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"task_vector", "selector.weight"} | {
        f"{path}.{i}.lora_{ab}" for path in ("feedback", "to_value") for i in range(12) for ab in "ab"
    }
    assert module.feedback[0].scaling == 1 / rank  # loralib: lora_alpha (1) / r
    decoders = [
        (lambda t, m=f: _ref_lora(t, m.base.weight, m.lora_a, m.lora_b, rank), lambda t, m=v: _ref_lora(t, m.base.weight, m.lora_a, m.lora_b, rank))
        for f, v in zip(module.feedback, module.to_value)
    ]
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        want, _ = _ref_toast(backbone, module.task_vector, module.selector.weight.T, decoders, images)
        assert (module(images) - want).abs().max() <= 1e-5
        merged = module.merge_lora()
        assert (merged(images) - want).abs().max() <= 1e-5


def test_released_init_trunc_normal_decoders_identity_selector() -> None:
    module = TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0))
    weights = torch.cat([m.weight.detach().flatten() for m in (*module.feedback, *module.to_value)])
    assert abs(float(weights.std()) - 0.02) < 0.001 and abs(float(weights.mean())) < 0.001
    assert float(weights.abs().max()) <= 2.0  # timm's trunc_normal_ bounds
    assert torch.equal(module.selector.weight, torch.eye(192))
    assert module.drop_rates == [float(r) for r in torch.linspace(0, 0.0, 12)]
    dropping = TopDownViT(_tiny_vit(), drop_path=0.1, generator=torch.Generator().manual_seed(0))
    assert dropping.drop_rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(images), dropping.eval()(images))  # eval never drops
        assert not torch.allclose(dropping.train()(images), dropping.eval()(images))  # stochastic depth only in training


def test_optimizer_and_schedule_are_the_released_ones(glyph_folder: Path, backbone_ckpt: Path) -> None:
    import math

    module = TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0))
    head = make_head(192, 50, torch.Generator().manual_seed(1))
    assert torch.all(head.bias == -math.log(99.0))  # prior 0.01
    assert abs(float(head.weight.std()) - math.sqrt(2 / 50)) < 0.05 * math.sqrt(2 / 50)  # kaiming_normal_, fan_out
    opt = make_optimizer(module, head)
    assert isinstance(opt, torch.optim.SGD)
    by_tensor = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert all(g["momentum"] == 0.9 and g["lr"] == 0.01 for g in opt.param_groups)
    assert by_tensor[id(head.bias)]["weight_decay"] == 0.0
    assert all(by_tensor[id(p)]["weight_decay"] == 1e-4 for p in (*module.toast_parameters(), head.weight))
    assert id(module.selector.weight) not in by_tensor

    epochs, warmup, lr = 6, 2, 0.02
    result = tune_toast(MODEL, glyph_folder, checkpoint=backbone_ckpt, img_size=SIZE, epochs=epochs, warmup_epochs=warmup,
                        lr=lr, batch_size=18, flip=False)

    def hand(e: int) -> float:  # linear warm-up from 0, then half a cosine over the remaining epochs
        return e / warmup if e < warmup else 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))

    assert result.epoch_lrs == pytest.approx([lr * hand(e) for e in range(epochs)], abs=1e-12)
    assert result.epoch_lrs[0] == 0.0 and result.epoch_lrs[warmup] == pytest.approx(lr)


def test_random_crop_and_flip_are_crops_of_the_resized_image() -> None:
    batch = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    for flip in (False, True):
        out = random_crop_flip(batch, 4, flip=flip, generator=gen)
        assert out.shape == (2, 3, 4, 4)
        for i in range(2):
            crops = [batch[i, :, t : t + 4, l : l + 4] for t in range(3) for l in range(3)]
            candidates = crops + ([c.flip(-1) for c in crops] if flip else [])
            assert any(torch.equal(out[i], c) for c in candidates)


def test_format_1_checkpoints_still_load_as_their_network(backbone_ckpt: Path, tmp_path: Path) -> None:
    """Checkpoints written before #19: bias-free learned value maps, unscaled LoRA; other formats are refused."""
    from fsdeploy.modules.toast_checkpoint import backbone_fingerprint

    backbone, pre = create_backbone(MODEL, checkpoint=backbone_ckpt, img_size=SIZE)
    old = TopDownViT(backbone, lite_rank=2, lora_alpha=2.0, value_path="learned", decoder_init="identity",
                     generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for m in (*old.feedback, *old.to_value):
            m.lora_b.normal_(0.0, 0.05, generator=gen)
    meta = {"adapter": "toast", "toast_format": 1, "lite_rank": 2, "img_size": SIZE, "backbone_sha256": backbone_fingerprint(backbone)}
    path = save_checkpoint(old.toast_state_dict(), tmp_path / "old.safetensors", name=MODEL, preprocess=pre, extra=meta)
    images = torch.randn(2, 3, SIZE, SIZE)
    # the format-1 network: v + W_l s (no value bias) with W = base + B A (no alpha / r)
    with torch.no_grad():
        want = old.eval()(images)
        assert torch.equal(old.feedback[0].merged().weight, old.feedback[0].base.weight + old.feedback[0].lora_b @ old.feedback[0].lora_a)
        torch.testing.assert_close(load_toast(MODEL, path, backbone_checkpoint=backbone_ckpt)(images), want, atol=1e-5, rtol=1e-5)
    for fmt in (0, 3):
        bad = save_checkpoint(old.toast_state_dict(), tmp_path / f"f{fmt}.safetensors", name=MODEL, preprocess=pre, extra={**meta, "toast_format": fmt})
        with pytest.raises(InvalidInput, match="re-run toast-tune"):
            load_toast(MODEL, bad, backbone_checkpoint=backbone_ckpt)
