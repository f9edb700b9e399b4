"""IDMM (`fsdeploy pretrain --recipe idmm`): CutMix box, λ and soft labels and label smoothing against hand
computation; a few steps on an unlabelled folder give a backbone that exports and validates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from fsdeploy.backbones import read_checkpoint
from fsdeploy.errors import InvalidInput
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.train import idmm
from tests.helpers import glyph_folder


class _Scripted:
    """A stand-in for np.random.Generator that returns fixed draws, so results can be computed by hand."""

    def __init__(self, beta: float, centre: tuple[int, int], perm: list[int]) -> None:
        self._beta, self._centre, self._perm = beta, list(centre), perm

    def beta(self, a: float, b: float) -> float:
        return self._beta

    def integers(self, high: int) -> int:
        return self._centre.pop(0)

    def permutation(self, n: int) -> np.ndarray:
        return np.array(self._perm)


def test_label_smoothing_by_hand() -> None:
    got = idmm.smoothed_targets(torch.tensor([2, 0]), 4, 0.1)
    want = torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    torch.testing.assert_close(got, want)
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 0.2, -1.0, 2.0]])
    # −Σ t log softmax by hand for row 0, then torch's own label-smoothed criterion for both rows
    lsm = logits[0] - torch.logsumexp(logits[0], 0)
    hand = -(0.025 * (lsm[0] + lsm[1] + lsm[3]) + 0.925 * lsm[2])
    assert idmm.soft_cross_entropy(logits[:1], got[:1]).item() == pytest.approx(hand.item(), rel=1e-6)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, torch.tensor([2, 0]))
    assert idmm.soft_cross_entropy(logits, got).item() == pytest.approx(ref.item(), rel=1e-6)


def test_cutmix_box_by_hand() -> None:
    # λ 0.64: side √0.36 · 10 = 6, centre (y 2, x 8): rows 2-3..2+3 clipped to 0..5, columns 5..11 clipped to 10
    assert idmm.cutmix_box(10, 10, 0.64, _Scripted(0, (2, 8), [])) == (0, 5, 5, 10)


def test_cutmix_images_lambda_and_labels_by_hand() -> None:
    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 10, 10).clone()  # image i is all i
    labels = torch.tensor([0, 1, 3])
    # Beta draw 0.36 -> λ = max(0.36, 0.64) = 0.64 -> box (0, 5, 5, 10): 25 of 100 pixels from the partner
    mixed, soft, lam = idmm.cutmix(x, labels, 4, alpha=0.5, smoothing=0.1, rng=_Scripted(0.36, (2, 8), [1, 2, 0]))
    assert lam == pytest.approx(0.75)
    assert torch.all(mixed[0, :, 0:5, 5:10] == 1) and torch.all(mixed[1, :, 0:5, 5:10] == 2)
    assert torch.all(mixed[2, :, 0:5, 5:10] == 0) and float(mixed[0].sum()) == 25.0
    assert torch.equal(x[:, :, 5:, :], mixed[:, :, 5:, :])  # outside the box untouched
    # row 0: own label 0 weight 0.75·0.9 + 0.025 = 0.7, partner label 1 weight 0.25·0.9 + 0.025 = 0.25, rest 0.025
    want = torch.tensor([[0.7, 0.25, 0.025, 0.025], [0.025, 0.7, 0.025, 0.25], [0.25, 0.025, 0.025, 0.7]])
    torch.testing.assert_close(soft, want)
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    official = 0.75 * ce(logits, labels) + 0.25 * ce(logits, labels[[1, 2, 0]])  # the released code's mixup_criterion
    assert idmm.soft_cross_entropy(logits, soft).item() == pytest.approx(official.item(), rel=1e-6)


def test_multicrop_views_and_crop_option() -> None:
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    group = idmm.CropGroup(4, (0.05, 0.4))
    views = idmm.make_views(images, group, idmm._view_transform(16, group.scale, 1.0))
    assert views.shape == (12, 3, 16, 16) and 0.0 <= float(views.min()) and float(views.max()) <= 1.0
    assert idmm.parse_crops("2,4") == idmm.OFFICIAL_CROPS
    with pytest.raises(InvalidInput, match="--crops"):
        idmm.parse_crops("2,x")


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("idmm")
    glyph_folder(root / "imgs" / "nested", classes="ABC", per_class=2, size=32)  # folder names are not labels here
    return root / "imgs"


def test_idmm_pretrains_a_vit_on_unlabelled_images_and_exports(unlabelled: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fsdeploy.cli import app

    widths = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: (widths.append(kw.get("num_classes")), create(name, **kw))[1])
    out = tmp_path / "vit.safetensors"
    args = ["pretrain", "vit_tiny_patch16_224", "--recipe", "idmm", "--data", str(unlabelled), "--out", str(out),
            "--img-size", "32", "--epochs", "1", "--batch", "4", "--max-steps", "1", "--threads", "1", "--no-fp16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert widths[0] == 6  # one class per image (3 letters x 2 renders)
    state, meta = read_checkpoint(out)
    assert meta["instances"] == 6 and meta["input_size"] == [3, 32, 32] and "--recipe idmm" in meta["train_command"]
    assert not any(k.startswith("head.") for k in state)
    bundle, report = export_bundle("vit_tiny_patch16_224", tmp_path / "bundle", checkpoint=out)
    assert report is not None and report.passed and bundle.manifest.feature_dim == 192


def test_idmm_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    glyph_folder(tmp_path / "one", classes="A", per_class=1)
    with pytest.raises(InvalidInput, match="at least 2"):
        idmm.idmm_pretrain(idmm.IdmmConfig("resnet18", tmp_path / "one", tmp_path / "o.safetensors"))
    with pytest.raises(InvalidInput, match="not a folder"):
        idmm.idmm_pretrain(idmm.IdmmConfig("resnet18", tmp_path / "missing", tmp_path / "o.safetensors"))
    from fsdeploy.cli import app

    result = CliRunner().invoke(app, ["pretrain", "resnet18", "--recipe", "moco", "--data", str(tmp_path), "--out",
                                      str(tmp_path / "o.safetensors")])
    assert result.exit_code != 0 and not (tmp_path / "o.safetensors").exists()
