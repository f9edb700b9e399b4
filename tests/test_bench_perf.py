"""Bench library checks on a tiny CaSE ResNet-18 (32 px): counted inputs of the cost model against
independent counts, and the equality half of issue #8 (head weights, deployed vs eager UpperCaSE).

Speed is never asserted here: timings are benchmark output (`fsdeploy bench perf`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsdeploy.backbones import save_checkpoint
from fsdeploy.bench.cost_inputs import bundle_costs, count_bundle, measure_case, torch_model, transform_macs
from fsdeploy.bench.costs import TaskShape
from fsdeploy.bench.latency import LatencyStats
from fsdeploy.bench.macs import count_macs
from fsdeploy.bench.measure import interleaved, run_child
from fsdeploy.bench.perf_measures import _compute_columns, _mean_distinct, _numpy_floor, ceiling_columns, head_fit_ratio, image_macs
from fsdeploy.bench.reference import timm_transform, torch_adapt, torch_predict
from fsdeploy.data.folders import list_images, scan_image_folder
from fsdeploy.data.images import load_checked
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.backbones import BuildRequest
from fsdeploy.exporters.rebuild import torch_graphs
from fsdeploy.heads import make_head
from fsdeploy.modules.case import case_hidden
from fsdeploy.modules.case_checkpoint import build_casenet, case_checkpoint_state
from fsdeploy.runtime import adapt_task, predict_images
from fsdeploy.train.tsa import bn_affine_adapt_macs, tsa_adapt_macs
from tests.helpers import glyph_folder, make_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def case_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_perf")
    plain = make_checkpoint("resnet18", root / "r18.safetensors", img_size=SIZE)
    # a meta-trained-like CaSE checkpoint: non-zero last layers, so γ differs from 1 and depends on the support set
    net, pre = build_casenet(BuildRequest("resnet18", checkpoint=plain, img_size=SIZE))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in net.cases:
            block.mlp[-1].weight.copy_(0.3 * torch.randn(block.mlp[-1].weight.shape, generator=g))
    ckpt = save_checkpoint(case_checkpoint_state(net), root / "r18case.safetensors", name="resnet18", preprocess=pre,
                           extra={"case_sites": [s.name for s in net.layout]})
    bundle, _ = export_bundle("resnet18", root / "case", adapter="case", checkpoint=ckpt, img_size=SIZE, validate=False)
    return bundle


@pytest.fixture(scope="module")
def counts(case_bundle):
    return count_bundle(case_bundle)


def test_case_counts_match_the_context_graph_and_the_mlp_formula(case_bundle, counts) -> None:
    net = torch_model(case_bundle)
    x = torch.zeros(1, 3, SIZE, SIZE)
    # the one-batch context graph does the query arithmetic per image plus every CaSE MLP once
    assert count_macs(net.context_module(), x).total == counts.case.forward + counts.case.mlp
    # each CaSE MLP is Linear(C,h) -> Linear(h,h) -> Linear(h,C) on one vector: 2Ch + h^2 MACs
    assert counts.case.mlp == sum(2 * s.length * case_hidden(s.length) + case_hidden(s.length) ** 2 for s in net.layout)
    assert counts.case.gamma == case_bundle.manifest.extra["gamma_size"]
    assert counts.backbone == count_macs(net.backbone, x).total == counts.case.forward
    assert measure_case(net, SIZE) == counts.case


def test_tsa_and_bn_affine_counts_equal_the_training_helpers_hook_counts(case_bundle, counts) -> None:
    backbone = torch_model(case_bundle).backbone
    # fsdeploy.train.tsa counts with forward hooks on Conv2d/Linear; the cost model with aten dispatch
    assert counts.tsa.forward + counts.tsa.backward == tsa_adapt_macs(backbone, SIZE, 1, steps=1)
    assert counts.bn_affine.forward + counts.bn_affine.backward == bn_affine_adapt_macs(backbone, SIZE, 1, steps=1)
    n = 7
    rows = {r.method: r for r in bundle_costs(case_bundle, TaskShape(3, n), counts=counts).rows}
    ncc = make_head("ncc")
    loss = ncc.fit_macs(n, counts.dim, 3) + ncc.predict_macs(n, counts.dim, 3)
    final = n * counts.tsa.forward + ncc.fit_macs(n, counts.dim, 3)
    assert rows["tsa"].adapt_macs - 40 * 3 * loss - final == tsa_adapt_macs(backbone, SIZE, n, steps=40)


def test_simpleshot_row_adds_cl2n_macs_not_a_per_task_mean(case_bundle, counts) -> None:
    n, k, d = 10, 5, counts.dim
    rows = {r.method: r for r in bundle_costs(case_bundle, TaskShape(k, n), counts=counts).rows}
    assert rows["simpleshot"].adapt_macs - rows["ncc"].adapt_macs == n * d == transform_macs("cl2n", n, d)
    assert rows["simpleshot"].params_adapted == rows["ncc"].params_adapted  # the base mean is per bundle, not per task
    assert rows["case-linear"].adapt_macs == n * counts.case.forward + counts.case.mlp + make_head("linear").fit_macs(n, d, k)
    for key in ("linear", "linear-newton", "case-linear"):  # the head's share is the head's own exact count
        assert rows[key].head_macs == make_head(rows[key].method.removeprefix("case-")).fit_macs(n, d, k)


def test_ceiling_inputs_are_the_counted_macs_and_the_numpy_floor(case_bundle, counts, monkeypatch) -> None:
    """Target 1's ceiling uses the query graph's counted MACs; target 2's numpy floor makes exactly two
    products per step over the distinct drawn rows."""
    assert image_macs(case_bundle) == counts.case.forward
    assert _mean_distinct(np.array([[0, 0, 1, 1], [2, 3, 4, 2], [5, 5, 5, 5]])) == 2  # (2 + 3 + 1) / 3
    from fsdeploy.heads import ops

    macs: list[int] = []
    real = ops.mm
    monkeypatch.setattr(ops, "mm", lambda a, b, out=None: (macs.append(ops.mm_macs(*a.shape, b.shape[1])), real(a, b, out=out))[1])
    feats = np.random.default_rng(0).random((9, 16), dtype=np.float32)
    _numpy_floor(feats, k=4, steps=5, rows=7, weight_decay=1e-5)()
    assert macs == [7 * 17 * 4] * 10


def test_ceiling_columns_by_hand() -> None:
    st = {"ort": LatencyStats((30.0, 50.0), 1), "torch": LatencyStats((100.0, 120.0), 1), "pre": LatencyStats((4.0, 6.0), 1)}
    row = {"torch_mean_ms": st["torch"].mean, **_compute_columns(st, macs=2_000_000_000)}
    row.update(ceiling_columns(row, 50.0))  # 2 GMAC at 50 GMAC/s: 40 ms after 5 ms preprocessing
    assert row["floor_ms"] == pytest.approx(45.0)
    assert row["ceiling"] == pytest.approx(110.0 / 45.0)
    assert row["ort_gmacs_s"] == pytest.approx(2.0 / 0.035)  # 2 GMAC in 40 - 5 ms
    faster = ceiling_columns(row, 100.0)  # a higher peak seen later in the run
    assert faster == pytest.approx({"peak_gmacs_s": 100.0, "floor_ms": 25.0, "ceiling": 110.0 / 25.0})


def test_numpy_linear_head_equals_the_pytorch_loop() -> None:
    row = head_fit_ratio(12, 24, 3, repeats=1, seed=3)
    assert row["max_abs_dweight"] <= 1e-5 and row["max_abs_dbias"] <= 1e-5
    assert row["numpy_median_ms"] > 0 and row["torch_median_ms"] > 0 and row["floor_ms"] > 0


def test_deployed_upper_case_agrees_with_pytorch_eager(case_bundle, tmp_path: Path) -> None:
    support = glyph_folder(tmp_path / "support", classes="ABCD", per_class=4, size=40)
    queries = glyph_folder(tmp_path / "queries", classes="ABCD", per_class=3, size=40, seed=5)
    # batch 6 < 16 support images: the deployed side runs the chunked context scheme, the eager side one batch
    task, _ = adapt_task(case_bundle, support, tmp_path / "task.npz", head="linear", batch=6, seed=2)
    files = scan_image_folder(support)
    graphs, transform = torch_graphs(case_bundle), timm_transform(case_bundle.manifest.preprocess)
    ref = torch_adapt(graphs, list(files.paths), files.labels, transform, tmp_path / "task.pt", seed=2)
    assert np.ptp(ref.gamma.numpy()) > 0.05  # CaSE does something here
    np.testing.assert_allclose(task.task_state["gamma"], ref.gamma.numpy(), atol=1e-5)
    head = task.model_state
    np.testing.assert_allclose(head["head.weight_"], ref.head.weight.detach().numpy(), atol=1e-4)
    paths = list_images([queries])
    ours = [task.classes.index(p.labels[0]) for p in predict_images(case_bundle, task, paths)]
    theirs = torch_predict(graphs, ref, paths, transform)
    assert np.mean(np.asarray(ours) == theirs) == 1.0
    # same preprocessing on both sides: fsdeploy's PIL/numpy path equals timm's torchvision transform
    from fsdeploy.bench.reference import load_images_torch

    np.testing.assert_allclose(load_checked(paths[:3], case_bundle.manifest.preprocess),
                               load_images_torch(paths[:3], transform).numpy(), atol=1e-5)


def test_torch_backend_feeds_case_graphs_in_export_order(case_bundle) -> None:
    """`bench latency --compare ort,torch` runs the CaSE query graph (images, gamma) on both backends."""
    from fsdeploy.runtime import feature_path

    images = load_checked(list_images([glyph_folder(Path(case_bundle.path.parent) / "imgs", classes="AB", per_class=2)]),
                          case_bundle.manifest.preprocess)
    ort, eager = feature_path(case_bundle, "ort"), feature_path(case_bundle, "torch")
    (fa, sa), (fb, sb) = ort.support([images]), eager.support([images])
    np.testing.assert_allclose(fa, fb, atol=1e-4)
    np.testing.assert_allclose(ort.query(images, sa), eager.query(images, sb), atol=1e-4)


def test_interleaved_gives_every_callable_its_calls_in_rounds() -> None:
    order: list[str] = []
    stats = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                        warmup=1, iters=4, rounds=2, batch=3)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert stats["a"].n == stats["b"].n == 4 and stats["a"].batch == 3


def test_run_child_reports_that_childs_peak_memory() -> None:
    small = run_child([sys.executable, "-c", "pass"])
    big = run_child([sys.executable, "-c", "import numpy as np; a = np.ones(40_000_000); print(a.sum())"])
    assert small.returncode == big.returncode == 0 and "40000000" in big.output
    # 40 M float64 = 305 MiB resident at once; the interpreter alone is far below that
    assert big.max_rss_mib - small.max_rss_mib >= 290
    assert small.max_rss_mib < 200


def test_photo_folders_hold_real_jpeg_crops_and_are_made_once(tmp_path: Path) -> None:
    from PIL import Image

    from fsdeploy.bench.workspace import photo_folder

    folder = photo_folder(tmp_path, "photos", classes=4, per_class=2, seed=1)
    files = scan_image_folder(folder)
    assert files.classes == ("class_000", "class_001", "class_002", "class_003") and len(files) == 8
    with Image.open(files.paths[0]) as img:
        assert img.format == "JPEG" and img.size == (320, 320)
    stamp = files.paths[0].stat().st_mtime_ns
    assert photo_folder(tmp_path, "photos", classes=4, per_class=2, seed=1) == folder
    assert files.paths[0].stat().st_mtime_ns == stamp  # reused, not rewritten


def test_adapt_and_memory_targets_run_on_every_installed_engine(case_bundle, tmp_path) -> None:
    """Targets 3 and 4 (issue #21): one row per engine installed here, each engine's task checked against the
    PyTorch eager task on the same queries; ORT runs the same recipe, so it labels them the same."""
    from fsdeploy.bench import perf_measures as pm

    support = glyph_folder(tmp_path / "support", classes="ABCDE", per_class=4)
    queries = glyph_folder(tmp_path / "queries", classes="ABCDE", per_class=2, seed=3)
    engines = pm.engine_sides()
    rows, agreement = pm.adapt_ratio(case_bundle, support, queries, tmp_path, threads={"ort": 1, "torch": 1}, repeats=1)
    assert agreement["ort"] == 1.0 and agreement["ort warm"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    sides = [r["side"] for r in rows]
    assert sides[-1] == pm.EAGER and len(sides) == 2 * len(engines) + 2
    assert [r["side"] for r in rows if r["session"] == "warm"] == [pm.warm_side(n, 20) for n in engines] + [pm.EAGER]
    assert agreement.keys() == set(engines) | {f"{n} warm" for n in engines}
    assert all(r["equals_cold_task"] for r in rows if "equals_cold_task" in r)  # a warm session's task is the cold one
    assert rows[-1]["ratio"] == 1.0 and all(r["total_median_ms"] > 0 for r in rows)
    mem, _ = pm.memory_and_linearity(case_bundle, [support, queries], tmp_path, threads=1)
    assert sorted({r["backend"] for r in mem}) == sorted([*engines, *(f"{n} (warm session, 2 tasks)" for n in engines)])
    assert all(r["max_rss_mib"] > 0 for r in mem)
    assert all("adapt_ms" in r for r in mem if r["backend"] == "ort")


def test_tune_reads_only_the_named_classes_and_its_seed(case_bundle, tmp_path) -> None:
    from fsdeploy.pipeline.tune import Candidate, tune_bundle

    folder = glyph_folder(tmp_path / "calib", classes="ABCDEFG", per_class=4)
    timer = lambda fns, batch: {k: (1.0, 1.0) for k in fns}  # noqa: E731 - latency is not what this checks
    recs = [tune_bundle(case_bundle, folder, classes=list("ABCDEF"), candidates=[Candidate("torch", "fp32")], ways=3,
                        shots=1, queries=2, episodes=4, timer=timer, record=False, seed=s) for s in (0, 1)]
    assert all(r.calibration["classes"] == 6 and r.calibration["images"] == 24 for r in recs)
