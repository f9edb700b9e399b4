"""What commands print, one design for all of them.

- `--json`: one JSON document on stdout and nothing else there (progress, notes and warnings go to stderr);
  NaN and infinities become null so any JSON reader takes it.
- Tables: rich tables on a terminal (they fit its width); when stdout is not a terminal (a pipe, a log
  file, CI) each table is printed as CSV under a `# title` line, so nothing is wrapped or cut at 80
  columns and the rows stay machine-readable. `FSDEPLOY_TABLES=rich` or `csv` forces one mode.
- Plain lines are never wrapped when stdout is not a terminal.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

TABLES_ENV = "FSDEPLOY_TABLES"  # auto (default) | rich | csv


def _plain(cell: Any) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        try:
            return Text.from_markup(cell).plain
        except Exception:  # not valid markup: the text as it is
            return cell
    return str(cell)


def table_csv(table: Table) -> str:
    """`table` as text: `# title`, a CSV header and rows (markup stripped), `# caption`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if table.title:
        buf.write(f"# {_plain(table.title)}\n")
    writer.writerow([_plain(c.header) for c in table.columns])
    columns = [list(c.cells) for c in table.columns]
    for i in range(table.row_count):
        writer.writerow([_plain(col[i]) if i < len(col) else "" for col in columns])
    if table.caption:
        buf.write(f"# {_plain(table.caption)}\n")
    return buf.getvalue().rstrip("\n")


def csv_tables(console: Console) -> bool:
    """Whether `console` prints tables as CSV (not a terminal, unless FSDEPLOY_TABLES says otherwise)."""
    mode = os.environ.get(TABLES_ENV, "auto").lower()
    if mode in ("rich", "table"):
        return False
    if mode == "csv":
        return True
    return not console.is_terminal


class OutConsole(Console):
    """A rich Console that follows the module docstring's rules for tables and line wrapping."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if csv_tables(self):
            if any(isinstance(o, Table) for o in objects):
                objects = tuple(table_csv(o) if isinstance(o, Table) else o for o in objects)
                kwargs["markup"] = False  # the CSV is plain text already
            kwargs.setdefault("soft_wrap", True)
            kwargs.setdefault("highlight", False)
        super().print(*objects, **kwargs)


def out_console() -> OutConsole:
    """The stdout console of a command module."""
    return OutConsole()


def json_safe(value: Any) -> Any:
    """`value` with dataclasses as dicts, tuples as lists, NaN/inf as None, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def echo_json(value: Any) -> None:
    """One JSON document on stdout (strict JSON: no NaN)."""
    typer.echo(json.dumps(json_safe(value), allow_nan=False))


def err_console() -> Console:
    """The stderr console of a command module (notes, progress): lines are never wrapped, so a log keeps each whole."""
    return Console(stderr=True, soft_wrap=True)
