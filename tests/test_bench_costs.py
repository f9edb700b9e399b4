"""Adaptation-cost model: hand formulas per method, and a real training run counted by FlopCounterMode."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fsdeploy.bench.costs import (
    DEFAULT_METHODS,
    TASK_PRESETS,
    CaseCounts,
    CountedMacs,
    Method,
    TaskShape,
    TrainedGraph,
    adaptation_costs,
    measure_backbone,
    missing_counts,
)
from fsdeploy.errors import InvalidInput, UnknownName
from fsdeploy.modules.ett import EttCounts


class FakeHead:
    """Stands in for fsdeploy.heads: distinct closed-form counts per (name, opts), linear-like predict."""

    def __init__(self, name: str, **opts: Any) -> None:
        self.c = 2 + len(name) + 10 * len(opts)

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int:
        return self.c * n_support * dim * n_classes + self.c

    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int:
        return n_query * dim * n_classes  # a linear classifier's product

    def n_params(self, dim: int, n_classes: int) -> int:
        return dim * n_classes + self.c


COUNTS = CountedMacs(
    dim=4,
    backbone=100,
    full=TrainedGraph(100, 190, 1000),
    partial=TrainedGraph(100, 30, 200),
    bn_affine=TrainedGraph(100, 95, 20),
    tsa=TrainedGraph(110, 120, 50),
    case=CaseCounts(forward=105, mlp=7, gamma=12),
    toast=130,
    ett=EttCounts(patch=3, linears=50, attn=20, attn_per_prefix=7, control=11, align=16, proj=5, stored=40, stored_per_prefix=9),
)
TASK = TaskShape.from_shots(3, 2)  # n = 6 support images, K = 3, D = 4


def fake_transform_macs(name: str, rows: int, dim: int) -> int:
    return (len(name) + 1) * rows * dim


def _rows(**kw: Any) -> dict[str, Any]:
    rows = adaptation_costs(COUNTS, TASK, make_head=FakeHead, transform_macs=fake_transform_macs, **kw)
    return {r.method: r for r in rows}


def _fit(name: str, n: int = 6, **opts: Any) -> int:
    return FakeHead(name, **opts).fit_macs(n, 4, 3)


def _params(name: str, **opts: Any) -> int:
    return FakeHead(name, **opts).n_params(4, 3)


def test_head_methods_pay_one_support_forward_and_the_head_fit() -> None:
    rows = _rows()
    for key, head in [("ncc", "ncc"), ("linear", "linear"), ("baseline", "baseline"), ("baseline++", "baseline++"),
                      ("lt-ncc", "lt-ncc"), ("linear-newton", "linear-newton")]:
        assert rows[key].adapt_macs == 6 * 100 + _fit(head)
        assert rows[key].query_macs == 100 + 4 * 3
        assert rows[key].params_adapted == _params(head)
        assert rows[key].backward == "none" and rows[key].steps is None
    cl2n = fake_transform_macs("cl2n", 6, 4)
    assert rows["simpleshot"].adapt_macs == 6 * 100 + cl2n + _fit("ncc")
    assert rows["simpleshot"].query_macs == 100 + fake_transform_macs("cl2n", 1, 4) + 4 * 3
    assert "cl2n transform" in rows["simpleshot"].recipe
    assert rows["toast"].adapt_macs == 6 * 130 + _fit("linear")
    assert rows["toast"].query_macs == 130 + 12


def test_case_pays_a_context_pass_the_mlps_once_and_a_linear_fit() -> None:
    row = _rows()["case-linear"]
    assert row.adapt_macs == 6 * 105 + 7 + _fit("linear")
    assert row.query_macs == 105 + 12
    assert row.params_adapted == 12 + _params("linear")


def test_finetuning_recipes_pay_steps_of_forward_backward() -> None:
    rows = _rows()
    classifier = 4 * 3  # linear classifier per image: forward; backward pays 2 more
    # full: 100 epochs over the 6 support images (Chen et al.'s loop, batches of 4)
    assert rows["full-ft"].adapt_macs == 100 * (6 * (100 + 190) + 3 * 6 * classifier)
    assert rows["full-ft-olor"].adapt_macs == rows["full-ft"].adapt_macs
    assert rows["full-ft"].params_adapted == 1000 + _params("linear")
    assert (rows["full-ft"].steps, rows["full-ft"].batch) == (100, 4)
    assert rows["partial-ft"].adapt_macs == 100 * (6 * (100 + 30) + 3 * 6 * classifier)
    # whole support set per step (batch None)
    assert rows["bn-affine"].adapt_macs == 40 * (6 * (100 + 95) + 3 * 6 * classifier)
    assert rows["maml-10"].adapt_macs == 10 * (6 * (100 + 190) + 3 * 6 * classifier)
    assert rows["maml-100"].adapt_macs == 100 * (6 * (100 + 190) + 3 * 6 * classifier)
    assert rows["maml-10"].query_macs == 100 + classifier
    assert "inner loop only" in rows["maml-10"].recipe and "10 steps x whole support" in rows["maml-10"].recipe


def test_tsa_pays_steps_with_ncc_loss_and_a_final_prototype_pass() -> None:
    row = _rows()["tsa"]
    loss = _fit("ncc") + 6 * 4 * 3
    assert row.adapt_macs == 40 * (6 * (110 + 120) + 3 * loss) + 6 * 110 + _fit("ncc")
    assert row.query_macs == 110 + 12
    assert row.params_adapted == 50 + _params("ncc")
    assert "frozen backbone" in row.backward


def test_ett_pays_an_init_pass_steps_and_a_final_pass() -> None:
    # by hand from the fake counts: N = 6, K = 3; plain forward 3 + 50 + 20 = 73, with 3 prefixes 73 + 21 = 94
    row = _rows()["ett"]
    loss = _fit("ncc") + 6 * 4 * 3
    step = 6 * (3 + 2 * 50 + 3 * (20 + 21)) + 3 * 3 * 11 + 3 * 6 * 16 + 4 * 3 * 5
    assert row.adapt_macs == 6 * 73 + 40 * step + 40 * 3 * loss + 6 * (94 + 16) + _fit("ncc")
    assert row.query_macs == 94 + 16 + 12 and row.params_adapted == 40 + 3 * 9 + _params("ncc")
    assert row.head_macs == 40 * 3 * loss + _fit("ncc")


def test_recipes_are_configurable_and_stated() -> None:
    methods = [replace(m, steps=3, batch=5) for m in DEFAULT_METHODS if m.key == "full-ft"]
    (row,) = adaptation_costs(COUNTS, TASK, methods, make_head=FakeHead)
    assert row.adapt_macs == 3 * (6 * (100 + 190) + 3 * 6 * 12)  # 3 epochs: each image once per epoch
    assert "3 epochs x batches of 5" in row.recipe


def test_every_default_method_gets_a_row_and_missing_counts_are_reported() -> None:
    assert set(_rows()) == {m.key for m in DEFAULT_METHODS}
    bare = CountedMacs(dim=4, backbone=100)
    missing = missing_counts(bare)
    rows = adaptation_costs(bare, TASK, make_head=FakeHead)
    plain = {m.key for m in DEFAULT_METHODS if m.kind == "head" and m.transform == "none"}
    assert {r.method for r in rows} == plain
    assert set(missing) == {m.key for m in DEFAULT_METHODS} - plain
    assert "transform_macs" in missing["simpleshot"]
    with pytest.raises(UnknownName, match="unknown kind"):
        adaptation_costs(COUNTS, TASK, [Method("x", "X", "magic")], make_head=FakeHead)
    with pytest.raises(InvalidInput, match="transforms apply to head methods only"):
        bad = Method("y", "Y", "finetune", transform="l2", steps=1, graph="full")
        adaptation_costs(COUNTS, TASK, [bad], make_head=FakeHead, transform_macs=fake_transform_macs)


def test_meta_dataset_sized_tasks_keep_exact_integers() -> None:
    big = replace(COUNTS, backbone=4_000_000_000, full=TrainedGraph(4_000_000_000, 8_000_000_000, 11_000_000))
    rows = {r.method: r for r in adaptation_costs(big, TASK_PRESETS["md-max"], make_head=FakeHead)}
    assert "simpleshot" not in rows
    assert rows["ncc"].adapt_macs == 500 * 4_000_000_000 + FakeHead("ncc").fit_macs(500, 4, 50)
    assert rows["full-ft"].adapt_macs == 100 * (500 * 12_000_000_000 + 3 * 500 * 4 * 50)
    assert rows["ncc"].ways == 50 and rows["ncc"].n_support == 500
    with pytest.raises(InvalidInput, match="support image per way"):
        TaskShape(5, 3)


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))


@pytest.mark.parametrize("graph", ["full", "partial", "bn_affine"])
def test_finetune_cost_equals_a_real_training_run_under_flop_counter(graph: str) -> None:
    """Run the recipe for real (backbone + nn.Linear classifier, S steps of batch B) and count it with torch."""
    torch.manual_seed(0)
    backbone, steps, batch, ways = TinyBackbone().eval(), 2, 3, 5
    counts = measure_backbone(backbone, 8, partial_from="blocks.1")
    assert counts.dim == 16 and counts.backbone == (8 * 8 * 8) * 27 + (8 * 8 * 8) * 72 + (16 * 4 * 4) * 72
    key = {"full": "full-ft", "partial": "partial-ft", "bn_affine": "bn-affine"}[graph]
    method = replace(next(m for m in DEFAULT_METHODS if m.key == key), steps=steps, batch=batch)
    (row,) = adaptation_costs(counts, TaskShape(ways, 10), [method], make_head=FakeHead)

    trainable = {
        "full": lambda n: True,
        "partial": lambda n: n.startswith("blocks.1."),
        "bn_affine": lambda n: isinstance(dict(backbone.named_modules())[n.rsplit(".", 1)[0]], nn.BatchNorm2d),
    }[graph]
    for n, p in backbone.named_parameters():
        p.requires_grad_(trainable(n))
    classifier = nn.Linear(16, ways)
    # full-ft, partial-ft: `steps` epochs over the 10 support images in batches of `batch`; bn-affine `steps` batches
    sizes = [min(batch, 10 - i) for _ in range(steps) for i in range(0, 10, batch)] if key != "bn-affine" else [batch] * steps
    with FlopCounterMode(display=False) as fc:
        for b in sizes:
            logits = classifier(backbone(torch.randn(b, 3, 8, 8)))
            nn.functional.cross_entropy(logits, torch.randint(0, ways, (b,))).backward()
    assert row.adapt_macs == fc.get_total_flops() // 2
    expected_params = sum(p.numel() for n, p in backbone.named_parameters() if trainable(n))
    assert row.params_adapted == expected_params + FakeHead("linear").n_params(16, ways)
