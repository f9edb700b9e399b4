"""`fsdeploy pretrain`: a few CPU steps on a tiny glyph slice, a checkpoint that loads as a backbone, exact resume."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fsdeploy.backbones import create_backbone, read_checkpoint
from fsdeploy.data.glyphs import generate_glyphs, load_splits
from fsdeploy.errors import InvalidInput
from fsdeploy.train.pretrain import PretrainConfig, pretrain, resume_path
from tests.test_glyphs import make_font_subset

MODEL = "resnet18"  # the fastest timm CNN on CPU; efficientnet_b0 takes the same code path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fonts = make_font_subset(tmp_path_factory.mktemp("fonts"))
    out = tmp_path_factory.mktemp("glyphs") / "c"
    generate_glyphs(out, size=32, seed=0, min_instances=6, max_instances=6, classes=12, font_dirs=[fonts])
    return out  # 4 base classes x 6 typefaces


def _config(corpus: Path, out: Path, **kw: object) -> PretrainConfig:
    base = PretrainConfig(MODEL, corpus, out, img_size=32, epochs=2, batch_size=8, lr=1e-3, device="cpu", fp16=False)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-epoch run through the CLI."""
    from fsdeploy.cli import app

    out = tmp_path_factory.mktemp("ckpt") / "backbone.safetensors"
    args = ["pretrain", MODEL, "--data", str(corpus), "--out", str(out), "--img-size", "32", "--epochs", "2",
            "--batch", "8", "--lr", "1e-3", "--device", "cpu", "--no-fp16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output and "wrote" in result.output
    return out


def test_checkpoint_loads_as_a_backbone_with_its_preprocessing(trained: Path, corpus: Path) -> None:
    model, pre = create_backbone(MODEL, checkpoint=trained)
    assert pre.input_size == (3, 32, 32) and pre.crop_pct == 1.0 and pre.interpolation == "bilinear"
    state, meta = read_checkpoint(trained)
    assert not any(k.startswith("fc.") for k in state)  # the temporary head is gone
    assert meta["classes"] == len(load_splits(corpus).base) == 4
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0
    assert meta["corpus_images_sha256"] == load_splits(corpus).meta["images_sha256"]
    assert "pretrain resnet18" in meta["train_command"]
    assert "--warmup-epochs 0.5" in meta["train_command"]  # every schedule option is in the recorded command
    with torch.random.fork_rng():  # pretrain's own initialisation: seed 0, same constructor
        torch.manual_seed(0)
        init, _ = create_backbone(MODEL, img_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained_feats, init_feats = model(x), init(x)
    assert trained_feats.shape == (2, 512)
    assert not torch.allclose(trained_feats, init_feats, atol=1e-3)  # training moved the features
    moved = [k for k, v in init.state_dict().items() if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])]
    assert "conv1.weight" in moved and "layer4.1.conv2.weight" in moved


def test_interrupted_run_resumes_to_the_same_weights(trained: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.safetensors"

    def crash_after_first_epoch(stats: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(corpus, out), on_epoch=crash_after_first_epoch)
    assert resume_path(out).is_file() and not out.exists()
    result = pretrain(_config(corpus, out, resume=True))
    assert result.resumed_from_epoch == 1 and [s.epoch for s in result.history] == [1, 2]
    assert not resume_path(out).exists()
    resumed, _ = read_checkpoint(out)
    straight, _ = read_checkpoint(trained)
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_refuses_state_from_other_settings(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"

    def stop(stats: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(corpus, out, epochs=1), on_epoch=stop)
    with pytest.raises(InvalidInput, match="other settings"):
        pretrain(_config(corpus, out, epochs=1, lr=5e-3, resume=True))


def test_rejects_a_folder_without_split_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="splits.json not found"):
        pretrain(_config(tmp_path, tmp_path / "x.safetensors"))


def test_channels_last_is_a_layout_only(corpus: Path, tmp_path: Path) -> None:
    """NHWC changes the memory layout, not the network: the first step's loss equals the NCHW run's.

    Later steps drift apart (Adam's first steps move every weight by about lr * sign(grad), and the sign of
    near-zero gradients differs in the last bits between conv algorithms), so only step 1 is compared.
    """
    losses: dict[bool, list[float]] = {True: [], False: []}
    for layout in (True, False):
        res = pretrain(_config(corpus, tmp_path / f"{layout}.safetensors", epochs=1, channels_last=layout),
                       on_step=lambda e, s, n, loss, layout=layout: losses[layout].append(loss))
        state, meta = read_checkpoint(res.checkpoint)
        assert all(v.is_contiguous() for v in state.values())  # saved in the standard layout
        assert ("--no-channels-last" in meta["train_command"]) is (not layout)
    assert abs(losses[True][0] - losses[False][0]) < 1e-5


def test_bf16_autocast_runs_and_is_recorded(corpus: Path, tmp_path: Path) -> None:
    res = pretrain(_config(corpus, tmp_path / "bf16.safetensors", epochs=1, precision="bf16"))
    state, meta = read_checkpoint(res.checkpoint)
    assert "--precision bf16" in meta["train_command"]
    assert meta["pretrain"]["precision"] == "bf16"
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    with pytest.raises(InvalidInput, match="--precision"):
        pretrain(_config(corpus, tmp_path / "x.safetensors", precision="fp8"))


def test_batchnorm_recalibration_equals_the_average_of_batch_statistics() -> None:
    """After the re-estimate, each BatchNorm's running mean/var are the plain average, over the batches, of the
    mean and unbiased variance of its input in train mode (PyTorch's cumulative average with momentum None),
    computed by hand with hooks on a copy run in the same batches."""
    import copy

    from fsdeploy.train.pretrain import _to_input, recalibrate_batchnorm

    model, _ = create_backbone(MODEL, img_size=32)
    x = (torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ref = copy.deepcopy(model).train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def keep(m: torch.nn.Module, a: tuple[torch.Tensor, ...], name: str) -> None:
        seen.setdefault(name, []).append((a[0].mean((0, 2, 3)), a[0].var((0, 2, 3), unbiased=True)))

    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: keep(m, a, name))
             for name, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for s in range(0, len(x), 16):  # the batches recalibrate_batchnorm uses below
            ref(_to_input(x[s : s + 16].float() / 255.0))
    for h in hooks:
        h.remove()
    model.eval()
    assert recalibrate_batchnorm(model, x, torch.device("cpu"), batch=16)
    assert not model.training  # the caller's mode is kept
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            means, vars_ = zip(*seen[name])
            assert torch.allclose(m.running_mean, torch.stack(means).mean(0), atol=1e-5)
            assert torch.allclose(m.running_var, torch.stack(vars_).mean(0), rtol=1e-4, atol=1e-6)
            assert m.momentum == 0.1  # restored
            checked += 1
    assert checked == 20  # resnet18's BatchNorms


def test_init_starts_from_the_given_weights(trained: Path, corpus: Path, tmp_path: Path) -> None:
    """--init loads the backbone weights (at lr 0 the learned ones stay exactly as given; BatchNorm's running
    statistics still move in train mode), records the start in the command and the resume fingerprint, and a missing
    file is refused before any training."""
    out = tmp_path / "from_init.safetensors"
    res = pretrain(_config(corpus, out, epochs=1, lr=0.0, recalibrate_bn=False, init=trained))
    got, meta = read_checkpoint(res.checkpoint)
    start, _ = read_checkpoint(trained)
    assert got.keys() == start.keys()
    learned = [k for k in start if k.endswith((".weight", ".bias"))]
    assert len(learned) > 40
    for k in learned:
        torch.testing.assert_close(got[k], start[k], rtol=0, atol=0, msg=k)
    assert f"--init {trained}" in meta["train_command"] and len(meta["pretrain"]["init_sha256"]) == 64
    fresh, _ = read_checkpoint(pretrain(_config(corpus, tmp_path / "fresh.safetensors", epochs=1, lr=0.0,
                                                recalibrate_bn=False)).checkpoint)
    assert not torch.equal(fresh["conv1.weight"], start["conv1.weight"])  # without --init: timm's init, not `trained`
    with pytest.raises(InvalidInput, match="--init"):
        pretrain(_config(corpus, tmp_path / "y.safetensors", init=tmp_path / "missing.safetensors"))
    assert not (tmp_path / "y.safetensors").exists()
