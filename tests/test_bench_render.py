"""Rendering: CSV/JSON round trips with types, rich tables, the accuracy-vs-MACs PNG, and mean_ci95."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict

import pytest
from PIL import Image
from rich.console import Console

from fsdeploy.bench.costs import CostRow
from fsdeploy.bench.latency import LatencyStats, compare, latency_rows
from fsdeploy.bench.render import (
    accuracy_table,
    compare_table,
    cost_table,
    format_macs,
    latency_table,
    merge_rows,
    plot_accuracy_vs_macs,
    read_rows,
    write_rows,
)
from fsdeploy.bench.stats import accuracy_row, mean_ci95
from fsdeploy.errors import InvalidInput

COSTS = [
    CostRow("ncc", "NCC / ProtoNet", "5-way 1-shot", 5, 5, "1 forward + ncc", None, None, "none",
            9_000_000_000, 1_800_000_000, 2560),
    CostRow("full-ft", "Full fine-tuning", "5-way 1-shot", 5, 5, "500 steps x batch 64, fwd+bwd", 500, 64,
            "all weights: input + weight grads", 85_000_000_000_000, 1_800_000_000, 11_000_000),
]


def _text(table) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_cost_rows_round_trip_with_types(tmp_path, suffix: str) -> None:
    path = write_rows(tmp_path / f"costs{suffix}", COSTS)
    expected = [asdict(r) for r in COSTS]
    assert read_rows(path, CostRow if suffix == ".csv" else None) == expected
    inferred = read_rows(path)
    assert inferred == expected
    assert [type(v) for v in inferred[1].values()] == [type(v) for v in expected[1].values()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_mixed_rows_round_trip_floats_bools_and_none(tmp_path, suffix: str) -> None:
    rows = latency_rows([("a", LatencyStats((1.0, 1.1, 0.9))), ("b", LatencyStats((1.0, 5.0), batch=8))])
    rows.append({"name": "c", "mean_ms": math.pi, "unstable": None, "warning": "x"})
    # CSV cannot tell '' from None: a partial schema keeps the text column a str, the rest is inferred
    back = read_rows(write_rows(tmp_path / f"lat{suffix}", rows), {"warning": str} if suffix == ".csv" else None)
    keys = list(rows[0])
    for got, want in zip(back, rows):
        for k in keys:
            assert got.get(k) == want.get(k) and type(got.get(k)) is type(want.get(k)), k


def test_csv_schema_mapping_and_errors(tmp_path) -> None:
    path = write_rows(tmp_path / "r.csv", [{"method": "007", "acc": 1}])
    assert read_rows(path, {"method": str, "acc": float}) == [{"method": "007", "acc": 1.0}]
    bad = write_rows(tmp_path / "s.csv", [{"acc": "x", "n": None}])
    with pytest.raises(InvalidInput, match="'acc' value 'x' is not a int"):
        read_rows(bad, {"acc": int})
    with pytest.raises(InvalidInput, match="'n' is empty but must hold int"):
        read_rows(bad, {"n": int})
    assert read_rows(bad, {"n": int | None}) == [{"acc": "x", "n": None}]
    with pytest.raises(InvalidInput, match="csv or .json"):
        write_rows(tmp_path / "r.txt", [{"a": 1}])
    with pytest.raises(InvalidInput, match="no rows file"):
        read_rows(tmp_path / "missing.json")


def test_tables_show_the_numbers() -> None:
    text = _text(cost_table(COSTS))
    assert "Full fine-tuning" in text and "85 T" in text and "1.8 G" in text and "11,000,000" in text
    lat = latency_rows([("ort", LatencyStats((1.0, 3.0))), ("torch", LatencyStats((2.0, 2.0)))])
    text = _text(latency_table(lat))
    assert "ort" in text and "unstable timing" in text
    text = _text(compare_table(compare(LatencyStats((4.0,)), LatencyStats((2.0,)), names=("torch", "ort"))))
    assert "2.000x" in text and "torch" in text
    acc = [accuracy_row("ncc", [0.5, 0.7, 0.6], setting="5w1s")]
    text = _text(accuracy_table(acc))
    assert "60.00 ±" in text and "5w1s" in text
    assert format_macs(None) == "-" and format_macs(999) == "999" and format_macs(1_500) == "1.5 k"


def test_mean_ci95_matches_the_textbook_formula() -> None:
    values = [0.2, 0.4, 0.4, 0.9, 0.55]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert half == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(mean_ci95([0.3])[1])
    with pytest.raises(InvalidInput, match="at least one value"):
        mean_ci95([])
    with pytest.raises(InvalidInput, match="nan or inf"):
        mean_ci95([0.1, float("nan")])


def test_plot_accuracy_vs_macs_writes_a_png(tmp_path) -> None:
    acc = [accuracy_row("ncc", [0.55, 0.6, 0.65], setting="5-way 1-shot"),
           accuracy_row("full-ft", [0.62, 0.7, 0.66], setting="5-way 1-shot")]
    rows = merge_rows(COSTS, acc, on=("method", "setting"))
    assert [r["method"] for r in rows] == ["ncc", "full-ft"] and rows[1]["adapt_macs"] == 85_000_000_000_000
    path = plot_accuracy_vs_macs(rows, tmp_path / "fig.png", title="test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 500
    with pytest.raises(InvalidInput, match="nothing to plot"):
        plot_accuracy_vs_macs([asdict(COSTS[0])], tmp_path / "empty.png")


def test_pareto_front_by_brute_force() -> None:
    """The frontier equals the points no other point dominates, checked pairwise on random clouds."""
    import numpy as np

    from fsdeploy.bench.plots import pareto_front

    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = [(float(c), float(v)) for c, v in rng.integers(0, 6, size=(12, 2))]
        dominated = {i for i, (c, v) in enumerate(pts) for j, (c2, v2) in enumerate(pts)
                     if (c2 <= c and v2 > v) or (c2 < c and v2 >= v) or (j < i and (c2, v2) == (c, v))}
        got = pareto_front(pts)
        assert set(got) == set(range(len(pts))) - dominated
        assert [pts[i][0] for i in got] == sorted(pts[i][0] for i in got)


def test_adaptation_cost_figure_has_a_panel_per_backbone_and_setting(tmp_path) -> None:
    from fsdeploy.bench.methods import regime
    from fsdeploy.bench.plots import plot_adaptation_cost

    assert regime("ncc") == "meta-learner" and regime("case-linear") == "UpperCaSE"
    assert regime("tsa") == "fine-tuner" and regime("bn-affine") == "fine-tuner"
    rows = [{"method": m, "backbone": b, "setting": s, "adapt_macs": macs, "accuracy": acc, "ci95": 1.0, "regime": regime(m)}
            for b in ("resnet18", "efficientnet_b0") for s in ("1-shot", "5-shot")
            for m, macs, acc in (("ncc", 1e8, 60.0), ("case-linear", 2e8, 63.0), ("tsa", 1e11, 64.0))]
    small = plot_adaptation_cost(rows[:3], tmp_path / "one.png")
    big = plot_adaptation_cost(rows, tmp_path / "grid.png", title="t")
    with Image.open(small) as a, Image.open(big) as b:
        assert b.width > 1.4 * a.width and b.height > 1.4 * a.height  # 2 x 2 panels vs 1


def test_figure_markers_are_unique_within_a_regime(tmp_path, monkeypatch) -> None:
    """Colour is the regime, so two methods of one regime must differ in marker (they shared circles before)."""
    import fsdeploy.bench.plots as plots

    drawn: dict[str, tuple[str, str]] = {}
    real = plots.plot_adaptation_cost

    rows = [{"method": f"m{i}", "label": f"method {i}", "backbone": "b", "setting": "5-shot", "adapt_macs": 1e8 * (i + 1),
             "accuracy": 50.0 + i, "ci95": 1.0, "regime": "meta-learner" if i % 2 else "fine-tuner"} for i in range(24)]
    from matplotlib.axes import Axes

    orig = Axes.errorbar

    def spy(self, x, y, *a, fmt="", color=None, **kw):
        drawn[f"{x[0]}"] = (fmt, color)
        return orig(self, x, y, *a, fmt=fmt, color=color, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy)
    real(rows, tmp_path / "f.png")
    by_regime: dict[str, list[str]] = {}
    for r in rows:
        fmt, _ = drawn[f"{r['adapt_macs']}"]
        by_regime.setdefault(r["regime"], []).append(fmt)
    for fmts in by_regime.values():
        assert len(fmts) == 12 and len(set(fmts)) == 12
