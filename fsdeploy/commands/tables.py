"""The one table renderer of a comparison (`fsdeploy.compare.CompareReport`): export validation, TensorRT
compare, and any other "do two runs agree" report print the same columns."""
from __future__ import annotations

from rich.table import Table

from fsdeploy.compare import CompareReport


def compare_table(report: CompareReport, *, title: str = "", ref: str = "max |ref|") -> Table:
    """One row per output check: graph, inputs, output, max |diff|, the reference's scale, cosine, ✓/✗."""
    table = Table(title=title or report.what or "comparison")
    centred = any(c.centred_cosine == c.centred_cosine for c in report.checks)  # any measured (not NaN)
    for col in ("graph", "inputs", "output", "max |diff|", ref, "cosine", *(("centred cos",) if centred else ()), "ok"):
        table.add_column(col)
    for c in report.checks:
        cc = (("-" if c.centred_cosine != c.centred_cosine else f"{c.centred_cosine:.5f}"),) if centred else ()
        table.add_row(c.graph, c.inputs, c.name, f"{c.max_abs:.2e}", f"{c.ref_max_abs:.3g}", f"{c.cosine:.6f}", *cc,
                      "[green]✓[/green]" if report.ok(c) else "[red]✗[/red]")
    graphs = sorted({c.graph for c in report.checks})
    tolerances = {report.tolerance(g) for g in graphs}
    if len(tolerances) > 1:
        table.caption = "tolerance " + "; ".join(f"{g}: {report.tolerance(g).text(ref)}" for g in graphs)
    else:
        table.caption = "tolerance " + (tolerances.pop() if tolerances else report.default).text(ref)
    return table
