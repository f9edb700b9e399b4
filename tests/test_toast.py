"""TOAST: identity at init, value-term maths, ONNX parity, MAC count, tuning touches only the top-down path."""
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
from fsdeploy.train.toast import tune_toast

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
    backbone = make()
    module = TopDownViT(backbone, generator=torch.Generator().manual_seed(0)).eval()
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
    full = TopDownViT(_tiny_vit(), generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in full.toast_parameters()) == dim + dim * dim + depth * 2 * dim * dim
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
        MODEL, glyph_folder, checkpoint=backbone_ckpt, img_size=SIZE, epochs=8, batch_size=9, lr=3e-3,
        recon_weight=0.1, out=tmp_path / "toast.safetensors",
    )
    after = result.module.backbone.state_dict()
    assert after.keys() == reference.keys()
    assert all(torch.equal(after[k], reference[k]) for k in reference)
    assert len(result.step_losses) == 16
    assert result.final_loss < result.initial_loss
    init = TopDownViT(create_backbone(MODEL, checkpoint=backbone_ckpt, img_size=SIZE)[0], generator=torch.Generator().manual_seed(0))
    start = init.toast_state_dict()
    for name, value in result.module.toast_state_dict().items():
        assert not torch.equal(value, start[name]), f"{name} did not move"

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
        "--img-size", str(SIZE), "--epochs", "2", "--batch-size", "9", "--lite-rank", "2",
    ])
    assert run.exit_code == 0, run.output
    assert "train accuracy" in run.output
    module = load_toast(MODEL, out, backbone_checkpoint=backbone_ckpt)
    assert module.lite_rank == 0 and toast_metadata(out)["lite_rank"] == 2  # merged on load


def test_non_vit_backbones_are_rejected() -> None:
    resnet = create_backbone("resnet18", img_size=SIZE)[0]
    with pytest.raises(InvalidInput, match="needs a timm VisionTransformer"):
        TopDownViT(resnet)


def test_bad_tuning_options_are_reported(glyph_folder: Path) -> None:
    with pytest.raises(InvalidInput, match="bad tuning options"):
        tune_toast(MODEL, glyph_folder, img_size=SIZE, lr=-1.0)
