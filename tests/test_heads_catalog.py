"""The head catalogue and the `fsdeploy heads` command built on it."""
from __future__ import annotations

import typer
from typer.testing import CliRunner

from fsdeploy.commands import heads as heads_command
from fsdeploy.heads import HEADS, TRANSFORMS, make_head
from fsdeploy.heads.catalog import head_costs, transform_infos


def test_catalogue_lists_every_head_with_its_own_counts() -> None:
    rows = head_costs(25, 1280, 5, opts={"linear": {"iters": 100}})
    assert [r.name for r in rows] == sorted(HEADS)
    for r in rows:
        head = make_head(r.name, **({"iters": 100} if r.name == "linear" else {}))
        assert (r.fit_macs, r.predict_macs, r.params) == (
            head.fit_macs(25, 1280, 5), head.predict_macs(1, 1280, 5), head.n_params(1280, 5))
        assert r.summary
    assert [t.name for t in transform_infos(8)] == sorted(TRANSFORMS)
    assert {t.name: t.macs_per_row for t in transform_infos(8)}["l2"] == 8


def test_heads_command_prints_both_tables() -> None:
    app = typer.Typer()
    heads_command.register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode, as in the real CLI
    result = CliRunner().invoke(app, ["heads", "--ways", "3", "--shots", "2", "--dim", "16"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in (*HEADS, *TRANSFORMS):
        assert name in result.output
    assert f"{make_head('linear').fit_macs(6, 16, 3):,}" in result.output
