"""Meta-training CaSE: only CaSE parameters change, the checkpoint loads back for export, the split file
selects classes, the per-task head follows the UpperCaSE recipe, and the CLI command runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from fsdeploy.backbones import create_backbone, read_checkpoint
from fsdeploy.errors import InvalidInput
from fsdeploy.adapters import build_adapted
from fsdeploy.backbones import BuildRequest
from fsdeploy.train.metatrain import (
    HeadRecipe,
    episode_classes,
    fit_head_torch,
    metatrain,
)
from fsdeploy.train.metatrain_cli import register_metatrain
from tests.helpers import glyph_folder, make_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("metatrain")
    data = glyph_folder(tmp / "glyphs", classes="ABCDEF", per_class=4, size=SIZE)
    (data / "splits.json").write_text(json.dumps({"base": ["A", "B", "C", "D"], "novel": ["E", "F"]}))
    ckpt = make_checkpoint("resnet18", tmp / "backbone.safetensors", img_size=SIZE)
    stats = []
    out = metatrain(
        "resnet18", data, tmp / "case.safetensors", checkpoint=ckpt, split="base", tasks=3, ways=3, shots=2, queries=2,
        accumulate=2, outer="context-gamma", head=HeadRecipe(iters=20), device="cpu", seed=0, progress=stats.append,
    )
    return ckpt, out, stats, data


def test_only_case_parameters_change(trained) -> None:
    ckpt, out, stats, _ = trained
    before, _ = read_checkpoint(ckpt)
    after, meta = read_checkpoint(out)
    backbone_keys = set(before)
    assert backbone_keys <= set(after)
    for k in backbone_keys:
        assert torch.equal(before[k], after[k]), k  # bit-identical backbone, BatchNorm statistics included
    case_keys = sorted(k for k in after if k.startswith("cases."))
    assert case_keys and set(after) == backbone_keys | set(case_keys)
    start = build_adapted("case", BuildRequest("resnet18", checkpoint=ckpt, img_size=SIZE)).module.cases.state_dict()
    moved = [k for k in case_keys if not torch.equal(after[k], start[k.removeprefix("cases.")])]
    assert any(k.endswith("mlp.4.weight") for k in moved)  # the zero-init last layer left zero
    assert [s.stepped for s in stats] == [False, True, True]  # every 2 tasks, plus the short last group
    assert meta["model"] == "resnet18" and len(meta["case_sites"]) == 17 and meta["metatrain"]["tasks"] == 3


def test_checkpoint_loads_for_export(trained) -> None:
    _, out, _, _ = trained
    built = build_adapted("case", BuildRequest("resnet18", checkpoint=out, img_size=SIZE))
    state, _ = read_checkpoint(out)
    for k, v in built.module.cases.state_dict().items():
        assert torch.equal(v, state["cases." + k])
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        feats, gamma = built.module(x)
    assert not torch.equal(gamma, torch.ones_like(gamma))
    plain, _ = create_backbone("resnet18", checkpoint=out)  # a metatrain checkpoint is also a backbone checkpoint
    assert feats.shape == plain(x).shape


def test_split_file_selects_classes(trained) -> None:
    _, _, _, data = trained
    assert episode_classes(data, "novel") == ["E", "F"]
    assert episode_classes(data, None) is None
    with pytest.raises(InvalidInput, match="has no split 'val'"):
        episode_classes(data, "val")


def test_head_matches_a_hand_written_adam_loop() -> None:
    """The per-task head against the same recipe written out by hand (Adam with L2 in the gradient)."""
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(9, 6, generator=g), torch.arange(9) % 3
    recipe = HeadRecipe(iters=30, batch=8)
    weight, bias = fit_head_torch(feats, labels, 3, np.random.default_rng(1), recipe)
    rows = np.random.default_rng(1).integers(0, 9, size=(30, 8))
    theta = torch.zeros(3, 7, dtype=torch.float64)
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    xa = torch.cat([feats, torch.ones(9, 1)], 1).double()
    for t, lr in enumerate(np.linspace(1e-3, 1e-5, 30)):
        x, y = xa[rows[t]], labels[rows[t]]
        p = torch.softmax(x @ theta.T, 1)
        grad = (p - torch.nn.functional.one_hot(y, 3)).T @ x / len(y) + 1e-5 * theta
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        theta -= lr * (m / (1 - 0.9 ** (t + 1))) / ((v / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
    torch.testing.assert_close(weight.double(), theta[:, :6], rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.double(), theta[:, 6], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [9, 40])  # fewer rows than a batch (count-weighted steps) and more
def test_head_matches_the_numpy_linear_head(n: int) -> None:
    from fsdeploy.heads.linear import LinearHead

    g = torch.Generator().manual_seed(n)
    feats, labels = torch.randn(n, 12, generator=g), torch.arange(n) % 4
    recipe = HeadRecipe(iters=50, batch=16)
    weight, bias = fit_head_torch(feats, labels, 4, np.random.default_rng(3), recipe)
    ref = LinearHead(iters=50, batch=16).fit(feats.numpy(), labels.numpy(), np.random.default_rng(3))
    np.testing.assert_allclose(weight.numpy(), ref.weight_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(bias.numpy(), ref.bias_, rtol=0, atol=1e-6)
    assert np.abs(ref.weight_).max() > 1e-3


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="must end in .safetensors"):
        metatrain("resnet18", tmp_path, tmp_path / "case.pt")
    with pytest.raises(InvalidInput, match=">= 1"):
        metatrain("resnet18", tmp_path, tmp_path / "case.safetensors", tasks=0)


def test_cli_command(trained, tmp_path: Path) -> None:
    ckpt, _, _, data = trained
    app = typer.Typer()
    register_metatrain(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps Typer from collapsing the app into `metatrain` itself
        pass

    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(app, [
        "metatrain", "resnet18", "--data", str(data), "--out", str(out), "--checkpoint", str(ckpt), "--tasks", "1",
        "--ways", "2", "--shots", "1", "--queries", "1", "--head-iters", "5", "--img-size", str(SIZE), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "export resnet18 --adapter case" in result.output
