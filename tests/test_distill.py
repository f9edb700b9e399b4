"""L2T-ww (`fsdeploy distill`): weighted matching loss vs a hand-written one, the lookahead vs torch.optim.SGD,
the meta-gradient vs finite differences on a toy teacher/student pair, and students that export and validate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
from typer.testing import CliRunner

from fsdeploy.backbones import read_checkpoint
from fsdeploy.errors import InvalidInput
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.train import l2tww
from fsdeploy.train.distill import DistillConfig, _Student, distill
from tests.helpers import glyph_folder, make_checkpoint


def _hand_loss(t_maps, s_maps, convs, pairs, cw, pw, beta):
    """The paper's loss written out per sample, channel and pixel in float64 numpy (1x1 conv as a dot product;
    the 2x teacher-to-student resize of bilinear/align_corners=False is a 2x2 block mean)."""
    total = 0.0
    b_count = t_maps[0].shape[0]
    for i, (m, n) in enumerate(pairs):
        t = t_maps[m].double().numpy()
        s = s_maps[n].double().numpy()
        w = convs[i].weight.detach().double().numpy()[:, :, 0, 0]
        bias = convs[i].bias.detach().double().numpy()
        if t.shape[-1] != s.shape[-1]:
            t = t.reshape(t.shape[0], t.shape[1], t.shape[2] // 2, 2, t.shape[3] // 2, 2).mean((3, 5))
        for b in range(b_count):
            sample = 0.0
            for c in range(t.shape[1]):
                sq = 0.0
                for y in range(s.shape[2]):
                    for x in range(s.shape[3]):
                        r = sum(w[c, k] * s[b, k, y, x] for k in range(s.shape[1])) + bias[c]
                        sq += (t[b, c, y, x] - r) ** 2
                mse = sq / (s.shape[2] * s.shape[3])
                sample += mse * (cw[i][b, c].item() if cw is not None else 1.0 / t.shape[1])
            total += beta * sample * (pw[i][b].item() if pw is not None else 1.0) / b_count
    return total


@pytest.mark.parametrize("weighted", [True, False])
def test_matching_loss_equals_the_hand_written_one(weighted: bool) -> None:
    g = torch.Generator().manual_seed(0)
    t_maps = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    s_maps = [torch.randn(2, 2, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    pairs = [(0, 0), (1, 1), (0, 1)]  # one pair needs the teacher map resized
    convs = l2tww.MatchingTransforms([3, 5], [2, 4], pairs)
    cw = [torch.softmax(torch.randn(2, t_maps[m].shape[1], generator=g), 1) for m, _ in pairs] if weighted else None
    pw = [torch.rand(2, generator=g) * 3 for _ in pairs] if weighted else None
    got = l2tww.matching_loss(t_maps, s_maps, convs, pairs, channel_weights=cw, pair_weights=pw, beta=0.5)
    assert got.item() == pytest.approx(_hand_loss(t_maps, s_maps, convs, pairs, cw, pw, 0.5), rel=1e-5)


def test_meta_networks_start_uniform_and_weights_are_per_sample() -> None:
    feats = [torch.randn(3, 6, 2, 2)]
    cw = l2tww.ChannelWeights([6], [(0, 0)])(feats)[0]
    pw = l2tww.PairWeights([6], [(0, 0)], init=1.0)(feats)[0]
    torch.testing.assert_close(cw, torch.full((3, 6), 1 / 6))  # zero-initialised "what" = uniform channels
    assert pw.shape == (3,) and torch.all((pw >= 0) & (pw <= 6))  # relu6 "where"


def test_lookahead_takes_the_steps_torch_sgd_takes() -> None:
    g = torch.Generator().manual_seed(1)
    w0, a = torch.randn(4, 3, generator=g), torch.randn(5, 4, generator=g)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a @ w).pow(2).sum()

    ref = nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):  # the first sets the momentum buffer the lookahead starts from
        opt.zero_grad()
        loss_of(ref).backward()
        opt.step()
        if _ == 0:
            start, buf = ref.detach().clone(), opt.state[ref]["momentum_buffer"].clone()
    got = l2tww.sgd_lookahead({"w": start.requires_grad_(True)}, [lambda p: loss_of(p["w"])] * 2, lr=0.1, momentum=0.9,
                              weight_decay=0.01, buffers={"w": buf})
    torch.testing.assert_close(got["w"].detach(), ref.detach(), rtol=1e-6, atol=1e-6)


class _ToyNet(nn.Module):
    """Two tapped conv stages and a linear head; tanh keeps second derivatives non-zero for the check."""

    def __init__(self, c1: int, c2: int, classes: int) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.Tanh())
        self.s2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.Tanh())
        self.head = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s2(self.s1(x)).mean((2, 3)))


def test_meta_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    teacher, net = _ToyNet(4, 5, 3).double().eval(), _ToyNet(3, 2, 3).double()
    x, y = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    pairs = [(0, 0), (1, 1), (1, 0)]
    taps = l2tww.FeatureTaps(teacher, ["s1", "s2"])
    with torch.no_grad():
        teacher(x)
    t_feats = taps.features()
    student = _Student(net, ["s1", "s2"], l2tww.MatchingTransforms([4, 5], [3, 2], pairs), pairs).double()
    what, where = l2tww.ChannelWeights([4, 5], pairs).double(), l2tww.PairWeights([4, 5], pairs).double()
    for p in list(what.parameters()) + list(where.parameters()):  # away from the zero init, so every path matters
        nn.init.normal_(p, std=0.5)
    meta = list(what.parameters()) + list(where.parameters())
    params = {k: p.detach().clone().requires_grad_(True) for k, p in student.named_parameters()}
    buffers = {k: 0.1 * torch.randn_like(p) for k, p in params.items()}
    hyper = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "buffers": buffers}

    def outer_at(create_graph: bool) -> torch.Tensor:
        with l2tww.functional(student) as call:
            cw, pw = what(t_feats), where(t_feats)
            theta = l2tww.sgd_lookahead(
                params, [lambda th: call(th, x, t_feats, cw, pw, 0.5)[1]] * 2
                + [lambda th: nn.functional.cross_entropy(call(th, x)[0], y)], create_graph=create_graph, **hyper)
            return nn.functional.cross_entropy(call(theta, x)[0], y)

    with l2tww.functional(student) as call:
        cw, pw = what(t_feats), where(t_feats)
        _, grads = l2tww.meta_gradient(
            params, meta, lambda th: call(th, x, t_feats, cw, pw, 0.5)[1],
            lambda th: nn.functional.cross_entropy(call(th, x)[0], y), steps=2, **hyper)
    assert max(float(g.abs().max()) for g in grads) > 1e-6  # the check below is not vacuous
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(3):  # directional derivatives along random directions in φ-space
        dirs = [torch.from_numpy(rng.standard_normal(tuple(p.shape))) for p in meta]
        with torch.no_grad():
            for p, d in zip(meta, dirs):
                p.add_(eps * d)
        up = float(outer_at(False))
        with torch.no_grad():
            for p, d in zip(meta, dirs):
                p.sub_(2 * eps * d)
        down = float(outer_at(False))
        with torch.no_grad():
            for p, d in zip(meta, dirs):
                p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, dirs))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9)
    taps.close()
    student._taps.close()


def test_hard_activation_swap_is_exact_and_twice_differentiable() -> None:
    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv3_small_050", num_classes=3).eval()
    swapped = l2tww.twice_differentiable_(timm.create_model("mobilenetv3_small_050", num_classes=3)).eval()
    swapped.load_state_dict(ref.state_dict())
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid)) for m in swapped.modules())
    x = torch.randn(2, 3, 32, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), ref(x), rtol=0, atol=1e-6)
    # one SE block with both activations: its second derivative exists (torch has none for hardsigmoid_backward)
    block = swapped.blocks[2][0]
    h = torch.randn(1, block.conv_pw.in_channels, 8, 8)
    w = block.conv_pw.weight
    (g,) = torch.autograd.grad(block(h).pow(2).sum(), w, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), w)
    assert torch.isfinite(gg).all() and float(gg.abs().max()) > 0


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    data = glyph_folder(root / "imgs", classes="ABCD", per_class=3, size=32)
    teacher = make_checkpoint("resnet18", root / "teacher.safetensors", img_size=32)
    return data, teacher


@pytest.mark.parametrize("method", ["l2t-ww", "uniform", "finetune"])
def test_students_train_save_preprocessing_and_export(method: str, setting: tuple[Path, Path], tmp_path: Path) -> None:
    from fsdeploy.cli import app

    data, teacher = setting
    out = tmp_path / "student.safetensors"
    args = ["distill", "--teacher", str(teacher), "--student", "mobilenetv3_small_050", "--data", str(data), "--out", str(out),
            "--method", method, "--batch", "6", "--epochs", "1", "--max-steps", "1", "--threads", "1",
            "--pairs", "3-3,2-1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _, meta = read_checkpoint(out)
    _, t_meta = read_checkpoint(teacher)
    assert meta["model"] == "mobilenetv3_small_050" and meta["teacher"] == "resnet18"
    assert meta["input_size"] == t_meta["input_size"] and meta["mean"] == t_meta["mean"]  # the teacher's preprocessing
    assert meta["pairs"] == ([] if method == "finetune" else [[3, 3], [2, 1]])
    bundle, report = export_bundle("mobilenetv3_small_050", tmp_path / "bundle", checkpoint=out)
    assert report is not None and report.passed
    assert bundle.manifest.preprocess.input_size == (3, 32, 32)


def test_bad_inputs_are_one_line_errors(setting: tuple[Path, Path], tmp_path: Path) -> None:
    data, teacher = setting
    with pytest.raises(InvalidInput, match="--method"):
        distill(DistillConfig(str(teacher), "resnet10t", data, tmp_path / "s.safetensors", method="kd"))
    with pytest.raises(InvalidInput, match="--pairs"):
        l2tww.parse_pairs("3-9", 4, 4)
    with pytest.raises(InvalidInput, match="does not exist"):
        distill(DistillConfig(str(tmp_path / "none.safetensors"), "resnet10t", data, tmp_path / "s.safetensors"))
    assert not (tmp_path / "s.safetensors").exists()


def test_vit_tokens_fold_into_maps_without_prefix_tokens() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # 1 class token + a 2x2 grid, 3 channels
    maps = l2tww.as_map(tokens, prefix_tokens=1)
    assert maps.shape == (2, 3, 2, 2)
    # grid position (y, x) is token 1 + 2y + x; channel c of it is tokens[b, 1 + 2y + x, c]
    assert maps[1, 2, 1, 0].item() == tokens[1, 1 + 2, 2].item()
    with pytest.raises(InvalidInput, match="square"):
        l2tww.as_map(torch.zeros(1, 4, 3), prefix_tokens=1)
