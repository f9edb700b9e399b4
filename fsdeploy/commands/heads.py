"""`fsdeploy heads`: list the per-task heads and feature transforms with their exact costs."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fsdeploy.commands.output import out_console

console = out_console()


def register(app: typer.Typer) -> None:
    """Add `heads` to `app`."""

    @app.command()
    def heads(
        ways: Annotated[int, typer.Option(min=1, help="Classes in the task (K).")] = 5,
        shots: Annotated[int, typer.Option(min=1, help="Support images per class; the support set has ways x shots.")] = 5,
        dim: Annotated[int, typer.Option(min=1, help="Feature size D of the backbone (1280 for efficientnet_b0).")] = 1280,
        as_json: Annotated[bool, typer.Option("--json", help="Print {heads: [...], transforms: [...]} as JSON instead of tables.")] = False,
    ) -> None:
        """List the heads `fsdeploy adapt --head` accepts and the transforms `--transform` accepts.

        Costs are exact multiply-accumulate counts of the numpy implementation for one task of this shape,
        so you can pick a head by its on-device cost: e.g. linear-newton fits a linear classifier with a
        small fraction of the linear head's MACs. Transductive heads (bd-cspn) rectify with the query batch:
        a prediction depends on the other images scored with it, and MACs / query is for a batch of one.
        Example: fsdeploy heads --ways 10 --shots 10 --dim 384
        """
        from fsdeploy.heads.catalog import head_costs, transform_infos

        n = ways * shots
        if as_json:
            from fsdeploy.commands.output import echo_json

            echo_json({"ways": ways, "support": n, "dim": dim, "heads": head_costs(n, dim, ways), "transforms": transform_infos(dim)})
            return
        table = Table(title=f"heads: {ways}-way, {n} support images, D={dim}")
        for col, justify in (("head", "left"), ("method", "left"), ("fit MACs", "right"),
                             ("MACs / query", "right"), ("params / task", "right")):
            table.add_column(col, justify=justify)
        for row in head_costs(n, dim, ways):
            table.add_row(row.name, row.summary, f"{row.fit_macs:,}", f"{row.predict_macs:,}", f"{row.params:,}")
        console.print(table)
        tr = Table(title="feature transforms (applied before the head)")
        for col, justify in (("transform", "left"), ("what it does", "left"), ("MACs / image", "right")):
            tr.add_column(col, justify=justify)
        for info in transform_infos(dim):
            tr.add_row(info.name, info.summary, f"{info.macs_per_row:,}")
        console.print(tr)
