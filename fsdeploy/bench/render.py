"""Render benchmark rows: rich tables, CSV/JSON files (written atomically, read back typed), PNG plots.

Measuring lives in macs.py, costs.py, latency.py and stats.py; this module only presents their rows,
so every output format shows the same numbers.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from fsdeploy.atomic import atomic_path, write_text
from fsdeploy.errors import InvalidInput

Row = Mapping[str, Any]

# ---- formatting


def format_macs(macs: float | None) -> str:
    """MACs with an SI prefix, e.g. 1.82 G; '-' when unknown."""
    if macs is None or (isinstance(macs, float) and math.isnan(macs)):
        return "-"
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(macs) >= div:
            return f"{macs / div:.3g} {unit}"
    return f"{macs:.0f}"


def _as_dict(row: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    if isinstance(row, Mapping):
        return dict(row)
    raise InvalidInput(f"a row must be a mapping or a dataclass instance, got {type(row).__name__}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# ---- rich tables


def cost_table(rows: Iterable[Any], title: str = "MACs to adapt one task") -> Table:
    """Table of cost rows (fsdeploy.bench.costs.CostRow or their dicts); one shared setting goes in the title."""
    rows = [_as_dict(r) for r in rows]
    settings = {str(r.get("setting", "")) for r in rows}
    shared = len(settings) == 1
    t = Table(title=f"{title}: {settings.pop()}" if shared and rows else title,
              caption="MACs: multiply-accumulates, counted on the graph; backward convention per row")
    cols = [("method", "left"), ("setting", "left"), ("adapt MACs", "right"), ("of which head", "right"),
            ("query MACs / image", "right"), ("params adapted", "right"), ("recipe", "left"), ("backward", "left")]
    for col, just in cols if not shared else [c for c in cols if c[0] != "setting"]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        cells = [str(r.get("label", r["method"])), str(r.get("setting", "")), format_macs(r["adapt_macs"]),
                 format_macs(r.get("head_macs")), format_macs(r["query_macs"]), f"{r['params_adapted']:,}",
                 str(r.get("recipe", "")), str(r.get("backward", ""))]
        t.add_row(*(cells if not shared else cells[:1] + cells[2:]))
    return t


LATENCY_EXTRAS = {"preprocess_ms": "preprocess (ms)", "end_to_end_ips": "with preprocess (img/s)"}


def latency_table(rows: Iterable[Any], title: str = "Latency (ms)") -> Table:
    """Table of `fsdeploy.bench.latency.latency_rows` output; unstable runs carry their warning.

    Rows that also carry `preprocess_ms` / `end_to_end_ips` (fsdeploy.bench.measure.PathLatency.row) get
    those columns after the engine's own throughput.
    """
    rows = [_as_dict(r) for r in rows]
    t = Table(title=title)
    cols = ("name", "batch", "iters", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "std_ms", "throughput_ips")
    extras = [c for c in LATENCY_EXTRAS if any(c in r for r in rows)]
    for c in cols:
        t.add_column(c.replace("_ips", " (img/s)").replace("_ms", ""), justify="left" if c == "name" else "right")
    for c in extras:
        t.add_column(LATENCY_EXTRAS[c], justify="right")
    t.add_column("note")
    for r in rows:
        t.add_row(*(_fmt(r.get(c)) for c in (*cols, *extras)),
                  "[yellow]" + r["warning"] + "[/]" if r.get("warning") else "")
    return t


def _fmt_value(key: str, value: Any) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        if math.isnan(value):
            return "-"
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return text + ("x" if key == "ratio" or key.endswith("_ratio") else "")
    if isinstance(value, int) and not isinstance(value, bool):
        return format_macs(value) if "macs" in key else f"{value:,}"
    return _fmt(value)


def rows_table(rows: Iterable[Any], title: str = "") -> Table:
    """Any list of flat rows as a table: one column per key (first-seen order), numbers formatted compactly.

    Floats get 3 significant digits (thousands and up: whole numbers with separators), MAC counts an SI
    prefix, and `ratio` columns an 'x'.
    """
    rows = [_as_dict(r) for r in rows]
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    t = Table(title=title)
    for k in keys:
        first = next((r[k] for r in rows if r.get(k) is not None), None)
        t.add_column(k, justify="right" if isinstance(first, (int, float)) and not isinstance(first, bool) else "left")
    for r in rows:
        t.add_row(*(_fmt_value(k, r.get(k)) for k in keys))
    return t


def status_table(rows: Iterable[Any], title: str = "Targets") -> Table:
    """One row per target {number, name, claim, measured, status}; met in green, anything else in yellow/red."""
    t = Table(title=title)
    for c in ("#", "target", "claim", "measured", "status"):
        t.add_column(c)
    for r in map(_as_dict, rows):
        status = str(r["status"])
        colour = "green" if status == "met" else "red" if status.startswith("NOT") else "yellow"
        t.add_row(str(r["number"]), str(r["name"]), str(r["claim"]), str(r["measured"]), f"[{colour}]{status}[/]")
    return t


def compare_table(rows: Iterable[Any], title: str = "Side-by-side (speedup = how many times faster the second is)") -> Table:
    """Table of `fsdeploy.bench.latency.compare` rows."""
    rows = [_as_dict(r) for r in rows]
    t = Table(title=title)
    for c in rows[0] if rows else ("stat", "speedup"):
        t.add_column(c, justify="left" if c == "stat" else "right")
    for r in rows:
        t.add_row(*(_fmt(v) + ("x" if k == "speedup" or k.endswith("_faster") else "") for k, v in r.items()))
    return t


def accuracy_table(rows: Iterable[Any], title: str = "Accuracy over episodes (mean +- 95% CI, %)") -> Table:
    """Table of accuracy rows {method, accuracy, ci95, episodes, ...} (see stats.accuracy_row)."""
    t = Table(title=title)
    rows = [_as_dict(r) for r in rows]
    extra = [k for k in (rows[0] if rows else {}) if k not in ("method", "accuracy", "ci95", "episodes")
             and (k != "diverged" or any(r.get(k) for r in rows))]  # a diverged column only where a fit diverged
    for c in ("method", *extra):
        t.add_column(c)
    t.add_column("accuracy (%)", justify="right")
    t.add_column("episodes", justify="right")
    for r in rows:
        t.add_row(str(r["method"]), *(_fmt(r.get(c)) for c in extra),
                  f"{r['accuracy']:.2f} ± {r['ci95']:.2f}", str(r.get("episodes", "")))
    return t


# ---- CSV / JSON


def write_rows(path: str | Path, rows: Sequence[Any]) -> Path:
    """Write rows (mappings or dataclasses) to .csv or .json, chosen by suffix, atomically.

    CSV: a header of every key in first-seen order; None is written as an empty cell.
    JSON: a list of objects (NaN is written as NaN, which Python's json reads back).

    Raises:
        InvalidInput: the suffix is neither .csv nor .json.
    """
    path = Path(path)
    dicts = [_as_dict(r) for r in rows]
    suffix = path.suffix.lower()
    if suffix == ".json":
        write_text(path, json.dumps(dicts, indent=2) + "\n")
    elif suffix == ".csv":
        keys: dict[str, None] = {}
        for d in dicts:
            keys.update(dict.fromkeys(d))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(keys), lineterminator="\n")
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in d.items()})
        with atomic_path(path, ".csv") as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
    else:
        raise InvalidInput(f"cannot write rows to {path.name}: use a .csv or .json file name")
    return path


def read_rows(path: str | Path, schema: type | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Read rows written by `write_rows`.

    JSON keeps its types. CSV cells are typed by `schema` (a dataclass such as CostRow, or a mapping
    column -> type for some or all columns; `X | None` allows empty cells) or, for columns it does not
    name, inferred: empty -> None, True/False -> bool, integer text -> int, float text -> float, else str.
    CSV cannot tell '' from None: declare text columns that may be empty as `str` to get '' back.

    Raises:
        InvalidInput: missing file, unknown suffix, or a cell that does not parse as its schema type.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"no rows file at {path}; write one with --out first")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise InvalidInput(f"{path} holds {type(data).__name__}, expected a list of rows")
        return data
    if suffix != ".csv":
        raise InvalidInput(f"cannot read rows from {path.name}: use a .csv or .json file")
    types_ = _schema_types(schema)
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: _parse(v, types_.get(k), k, path) for k, v in row.items()} for row in csv.DictReader(f)]


def _schema_types(schema: type | Mapping[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        return {}
    if isinstance(schema, Mapping):
        return dict(schema)
    if dataclasses.is_dataclass(schema):
        return typing.get_type_hints(schema)
    raise InvalidInput(f"schema must be a dataclass or a mapping of column types, got {schema!r}")


_INT = re.compile(r"[+-]?\d+")


def _parse(text: str, kind: Any, column: str, path: Path) -> Any:
    if kind is None:
        return _infer(text)
    args = typing.get_args(kind)
    optional = type(None) in args
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in args if a is not type(None))
    if text == "":
        if optional or kind is str:
            return None if optional else ""
        raise InvalidInput(f"{path}: column {column!r} is empty but must hold {kind.__name__}")
    try:
        if kind is bool:
            return {"True": True, "False": False}[text]
        return kind(text)
    except (KeyError, ValueError) as exc:
        raise InvalidInput(f"{path}: column {column!r} value {text!r} is not a {kind.__name__}") from exc


def _infer(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if _INT.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def merge_rows(left: Iterable[Any], right: Iterable[Any], on: Sequence[str] = ("method",)) -> list[dict[str, Any]]:
    """Inner join of two row lists on the `on` columns (e.g. cost rows with accuracy rows for the plot)."""
    index = {tuple(r.get(k) for k in on): r for r in map(_as_dict, right)}
    out = []
    for r in map(_as_dict, left):
        match = index.get(tuple(r.get(k) for k in on))
        if match is not None:
            out.append({**r, **match})
    return out


# ---- plots


def plot_accuracy_vs_macs(rows: Iterable[Any], path: str | Path, *, title: str = "") -> Path:
    """PNG of accuracy vs MACs to adapt one task: `fsdeploy.bench.plots.plot_adaptation_cost` on these rows.

    Raises:
        InvalidInput: no row has positive MACs and an accuracy.
    """
    from fsdeploy.bench.plots import plot_adaptation_cost

    return plot_adaptation_cost(map(_as_dict, rows), path, title=title)
