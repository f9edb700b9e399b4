"""PNG plots of benchmark rows: accuracy against MACs to adapt one task, one panel per backbone and setting.

Every method gets one marker, the same in every panel, coloured by its regime (meta-learner or cheap head,
fine-tuner, UpperCaSE), and one legend entry: no text floats beside the points, so nothing overlaps however
close the points are. Each panel draws its Pareto frontier: the methods no other method beats in accuracy
at fewer or equal MACs.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fsdeploy.atomic import atomic_path
from fsdeploy.deps import require
from fsdeploy.errors import InvalidInput

REGIME_COLOURS = {"meta-learner": "#1f77b4", "fine-tuner": "#d62728", "UpperCaSE": "#2ca02c"}
OTHER_COLOUR = "#7f7f7f"
MARKERS = "osD^vP*Xh<>p8d"


def ci_of(row: dict[str, Any]) -> float:
    """The row's 95% CI half-width, 0 when it has none (one episode) or it is not a number."""
    ci = row.get("ci95")
    return 0.0 if ci is None or (isinstance(ci, float) and math.isnan(ci)) else float(ci)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) that no other point dominates (cost <= and value >, or cost < and
    value >=), in increasing cost; ties in both keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _name(row: dict[str, Any]) -> str:
    return str(row.get("label") or row.get("method") or "")


def plot_adaptation_cost(rows: Iterable[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy (%, 95% CI bars) vs MACs to adapt one task (log x): columns per `backbone`, rows per `setting`.

    Rows need `adapt_macs` > 0 and `accuracy`; `ci95`, `regime`, `backbone` and `setting` are optional.

    Raises:
        InvalidInput: no row has positive MACs and an accuracy.
    """
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from fsdeploy.bench.render import format_macs

    pts = [dict(r) for r in rows if (r.get("adapt_macs") or 0) > 0 and r.get("accuracy") is not None]
    if not pts:
        raise InvalidInput("nothing to plot: rows need adapt_macs > 0 and accuracy (merge cost and accuracy rows)")
    backbones = list(dict.fromkeys(str(r.get("backbone", "")) for r in pts))
    settings = list(dict.fromkeys(str(r.get("setting", "")) for r in pts))
    methods = list(dict.fromkeys(_name(r) for r in pts))
    regime = {_name(r): str(r.get("regime", "")) for r in pts}
    # markers count within each regime (the colour): two methods of one colour never share a marker (up to 14)
    marker = {m: MARKERS[[x for x in methods if regime[x] == regime[m]].index(m) % len(MARKERS)] for m in methods}
    colour = {m: REGIME_COLOURS.get(regime[m], OTHER_COLOUR) for m in methods}
    ncol = 3 if len(backbones) > 1 else 2
    legend_in = 0.17 * math.ceil((len(methods) + 4) / ncol) + 0.25  # legend rows below the panels, in inches
    height = 3.4 * len(settings) + 0.5 + legend_in
    fig = Figure(figsize=(max(6.4, 4.6 * len(backbones) + 0.4), height), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(settings), len(backbones), squeeze=False)
    for si, setting in enumerate(settings):
        for bi, backbone in enumerate(backbones):
            ax = axes[si][bi]
            panel = [r for r in pts if str(r.get("backbone", "")) == backbone and str(r.get("setting", "")) == setting]
            for r in panel:
                m = _name(r)
                ax.errorbar([r["adapt_macs"]], [r["accuracy"]], yerr=[ci_of(r)], fmt=marker[m], color=colour[m],
                            markersize=6, capsize=3, elinewidth=1, markeredgecolor="black", markeredgewidth=0.4)
            front = [panel[i] for i in pareto_front([(r["adapt_macs"], r["accuracy"]) for r in panel])]
            if len(front) > 1:
                ax.step([r["adapt_macs"] for r in front], [r["accuracy"] for r in front], where="post",
                        color="black", linestyle="--", linewidth=0.9, zorder=0)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled decades only: minor labels collide at 7 pt
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_macs(v)))
            xs = [r["adapt_macs"] for r in panel]
            if xs and max(xs) / min(xs) < 10:  # no decade to label inside: label 1-2-5 steps over at least 4x
                if max(xs) / min(xs) < 4:
                    g = math.sqrt(max(xs) * min(xs))
                    ax.set_xlim(g / 2, g * 2)
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", axis="x", alpha=0.1)
            ax.margins(x=0.08, y=0.1)
            ax.set_title(" · ".join(t for t in (backbone, setting) if t), fontsize=9)
            if si == len(settings) - 1:
                ax.set_xlabel("MACs to adapt one task (log scale)", fontsize=8)
            if bi == 0:
                ax.set_ylabel("accuracy (%), mean ± 95% CI", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [Line2D([], [], marker=marker[m], color=colour[m], linestyle="", markeredgecolor="black",
                      markeredgewidth=0.4, label=m) for m in methods]
    handles += [Line2D([], [], color="black", linestyle="--", linewidth=0.9, label="Pareto frontier")]
    handles += [Line2D([], [], marker="s", color=c, linestyle="", markersize=8, label=f"regime: {name}")
                for name, c in REGIME_COLOURS.items() if name in regime.values()]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 13)), fontsize=10)  # ~13 chars per inch at 10 pt
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
