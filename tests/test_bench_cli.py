"""`fsdeploy bench` smoke runs on a tiny ResNet-18 (32 px): every subcommand end to end, its printed and
written numbers equal to the library's, rows files written atomically and readable back.

No timing is asserted: speed figures are benchmark output.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fsdeploy.pipeline.base_mean import add_base_mean
from fsdeploy.bench.accuracy import evaluate
from fsdeploy.bench.cost_inputs import bundle_costs, count_bundle
from fsdeploy.bench.costs import TASK_PRESETS, CostRow, TaskShape
from fsdeploy.bench.methods import accuracy_methods
from fsdeploy.bench.render import format_macs, read_rows
from fsdeploy.cli import app
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.pipeline.export import export_bundle
from fsdeploy.heads import make_head
from tests.helpers import glyph_folder, make_checkpoint

runner = CliRunner(env={"COLUMNS": "300"})  # wide enough that rich never wraps a number


def invoke(*args: str) -> tuple[int, str]:
    from fsdeploy import cli

    result = runner.invoke(app, ["bench", *args], standalone_mode=False, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if isinstance(result.exception, cli.FsdeployError):
            return 1, str(result.exception)
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A perf work folder holding the resnet18 stand-in weights and its bundle, where `bench perf` reuses them."""
    root = tmp_path_factory.mktemp("bench_cli")
    ckpt = make_checkpoint("resnet18", root / "resnet18-random-init-32px.safetensors", img_size=32)
    bundle, _ = export_bundle("resnet18", root / "resnet18-none-32px", checkpoint=ckpt, img_size=32, validate=False)
    glyph_folder(root / "glyphs", classes="ABCDEF", per_class=10, size=40)
    glyph_folder(root / "base", classes="UVWXYZ", per_class=2, size=40, seed=5)
    add_base_mean(bundle, root / "base")  # SimpleShot centres on it
    glyph_folder(root / "support", classes="ABC", per_class=3, size=40, seed=3)
    return root


@pytest.fixture(scope="module")
def bundle(work):
    from fsdeploy.bundle import load_bundle

    return load_bundle(work / "resnet18-none-32px")


@pytest.fixture(scope="module")
def counts(bundle):
    return count_bundle(bundle)


def test_macs_prints_and_writes_the_librarys_counts(work, bundle, counts) -> None:
    code, out = invoke("macs", str(bundle.path), "--ways", "3", "--shots", "2", "--out", str(work / "costs.json"))
    assert code == 0, out
    expected = bundle_costs(bundle, TaskShape.from_shots(3, 2), counts=counts)
    assert json.loads((work / "costs.json").read_text()) == [r.as_dict() for r in expected.rows]
    for r in expected.rows:
        line = next(line for line in out.splitlines() if r.label in line)
        assert format_macs(r.adapt_macs) in line and format_macs(r.query_macs) in line and f"{r.params_adapted:,}" in line
    assert "not costed: case-linear" in out and "--adapter case" in out
    assert "tsa" in {r.method for r in expected.rows}  # ResNet: TSA adapters are counted


def test_accuracy_rows_equal_the_library_and_feed_the_macs_plot(work, bundle, counts) -> None:
    acc = work / "acc.json"
    code, out = invoke("accuracy", str(bundle.path), "--data", str(work / "glyphs"), "--ways", "5", "--shots", "1,5",
                       "--queries", "2", "--episodes", "3", "--methods", "ncc,simpleshot,linear-newton", "--out", str(acc))
    assert code == 0, out
    rows = read_rows(acc)
    assert [(r["method"], r["shots"]) for r in rows] == [(m, s) for s in (1, 5) for m in
                                                        ("NCC / ProtoNet", "SimpleShot (CL2N + NCC)", "Linear head (Newton)")]
    data = scan_image_folder(work / "glyphs")
    methods = accuracy_methods(["ncc", "simpleshot", "linear-newton"], "none")
    ref = evaluate(bundle, data, methods, ways=5, shots=5, queries=2, episodes=3, seed=5)
    assert [r["accuracy"] for r in rows[3:]] == pytest.approx([r.accuracy for r in ref])
    assert f"{ref[0].accuracy:.2f} ± {ref[0].ci95:.2f}" in out

    code, out = invoke("macs", str(bundle.path), "--setting", "5w1s", "--setting", "5w5s", "--out", str(work / "costs.csv"),
                       "--accuracy", str(acc), "--plot", str(work / "fig.png"))
    assert code == 0, out
    back = read_rows(work / "costs.csv", schema=CostRow)
    expected = [r.as_dict() for s in ("5w1s", "5w5s") for r in bundle_costs(bundle, TASK_PRESETS[s], counts=counts).rows]
    assert back == expected
    assert (work / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(6 methods with accuracy)" in out  # 3 methods x 2 settings joined on label and shots
    assert not list(work.glob("*.tmp*")) and not list(work.glob(".*costs*"))


def test_accuracy_with_variable_ways_and_shots(work, bundle) -> None:
    code, out = invoke("accuracy", str(bundle.path), "--data", str(work / "glyphs"), "--variable", "--episodes", "2",
                       "--methods", "ncc", "--out", str(work / "var.csv"))
    assert code == 0, out
    (row,) = read_rows(work / "var.csv")
    assert row["ways"] == "var" and row["shots"] == "var" and row["episodes"] == 2 and 0 <= row["accuracy"] <= 100


def test_finetune_accuracy_draws_the_episodes_evaluate_draws(work, bundle) -> None:
    from fsdeploy.bench.accuracy import Method
    from fsdeploy.bench.finetune_accuracy import finetune_accuracy

    data = scan_image_folder(work / "glyphs")
    # with 0 steps BN-affine leaves the backbone as it is, so its cosine-NCC head must score exactly what the
    # deployed path scores with the same head on the same episodes
    row = finetune_accuracy(bundle, data, "bn-affine", label="r18", ways=3, shots=2, queries=3, episodes=4, seed=9, steps=0)
    (ref,) = evaluate(bundle, data, [Method("cos", "ncc", opts={"distance": "cosine", "scale": 10.0})], ways=3, shots=2,
                      queries=3, episodes=4, seed=9)
    assert row.accuracy == pytest.approx(ref.accuracy) and row.ci95 == pytest.approx(ref.ci95)
    assert row.method == "bn-affine" and row.episodes == 4 and row.bundle == "r18"


def test_latency_compare_and_adaptation_parts(work, bundle) -> None:
    out_csv = work / "latency.csv"
    code, out = invoke("latency", str(bundle.path), "--compare", "ort,torch", "--batches", "1,2", "--warmup", "1",
                       "--iters", "2", "--rounds", "1", "--images", str(work / "glyphs" / "A"),
                       "--support", str(work / "support"), "--methods", "ncc,linear-newton", "--adapt-repeats", "1",
                       "--threads", "1", "--out", str(out_csv))
    assert code == 0, out
    rows = read_rows(out_csv)
    lat = [r for r in rows if r["kind"] == "latency"]
    assert sorted((r["name"], r["batch"]) for r in lat) == [("ort", 1), ("ort", 2), ("torch", 1), ("torch", 2)]
    assert all(r["iters"] == 2 and r["preprocess_ms"] > 0 and r["end_to_end_ips"] < r["throughput_ips"] for r in lat)
    ratios = [r for r in rows if r["kind"] == "compare"]
    assert len(ratios) == 12 and {r["stat"] for r in ratios} >= {"mean_ms", "p99_ms", "throughput_ips"}
    for r in ratios:
        if r["stat"] == "mean_ms":
            assert r["speedup"] == pytest.approx(r["ort"] / r["torch"])
    adapt = [r for r in rows if r["kind"] == "adaptation"]
    assert [r["method"] for r in adapt] == ["ncc", "linear-newton"]
    for r in adapt:
        assert r["support"] == 9
        assert r["total_ms"] == pytest.approx(r["load_ms"] + r["features_ms"] + r["fit_ms"] + r["write_ms"])
    assert "side by side" in out and "adaptation wall time" in out


def test_perf_reports_each_target_with_status(work, bundle) -> None:
    report = work / "perf.json"
    code, out = invoke("perf", "--quick", "--workdir", str(work), "--targets", "5", "--case-model", "resnet18",
                       "--data", str(work / "glyphs"), "--episodes", "3", "--threads", "1", "--out", str(report))
    assert code == 0, out
    data = json.loads(report.read_text())
    (result,) = data["results"]
    assert result["number"] == 5 and result["status"].startswith("partial: 3 episodes")
    (rows,) = data["tables"].values()
    dim = bundle.manifest.feature_dim
    for r in rows:
        assert r["fit_macs"] == make_head(r["head"]).fit_macs(25, dim, 5) and r["episodes"] == 3
    assert result["ratio"] == pytest.approx(rows[0]["fit_macs"] / rows[1]["fit_macs"])
    assert "issue #8 targets" in out and "fast head solver" in out


def test_bad_arguments_say_what_to_pass(work, bundle) -> None:
    code, out = invoke("macs", str(work / "glyphs"))
    assert code == 1 and "not a bundle" in out
    code, out = invoke("macs", str(bundle.path), "--setting", "7w3s")
    assert code == 1 and "unknown setting" in out and "md-max" in out
    code, out = invoke("accuracy", str(bundle.path), "--data", str(work / "glyphs"), "--methods", "svm")
    assert code == 1 and "unknown head method" in out
    code, out = invoke("perf", "--targets", "9", "--workdir", str(work))
    assert code == 1 and "unknown perf targets" in out
    code, out = invoke("macs", str(bundle.path), "--plot", str(work / "x.png"))
    assert code == 1 and "--plot needs --accuracy" in out and not (work / "x.png").exists()


def test_a_diverging_fine_tuner_scores_its_episodes_at_chance_and_counts_them(work, bundle) -> None:
    from dataclasses import replace

    (full,) = accuracy_methods(["full-ft"], "none")  # frozen BatchNorm: nothing rescales the blown-up weights
    blown = replace(full, label="full-ft, lr 1e9", opts={**dict(full.opts), "lr": 1e9})  # SGD at 1e9: the loss overflows
    data = scan_image_folder(work / "glyphs")
    (row,) = evaluate(bundle, data, [blown], ways=4, shots=1, queries=2, episodes=2, seed=3)
    assert row.diverged == 2 and row.episodes == 2
    assert row.accuracy == pytest.approx(100.0 / 4) and row.ci95 == pytest.approx(0.0)
