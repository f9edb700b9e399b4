"""One name per method across the benchmarks: cost rows (`costs.DEFAULT_METHODS` keys) and accuracy runs.

`bench accuracy --heads ncc,simpleshot,linear` evaluates the head methods of the cost table under the
same labels, so `bench macs --accuracy` can put accuracy next to MACs without a hand-made mapping. On a
CaSE bundle the features are CaSE features: the `linear` head there is UpperCaSE (`case-linear`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fsdeploy.bench.accuracy import Method as AccuracyMethod
from fsdeploy.bench.costs import DEFAULT_METHODS, Method, TaskShape
from fsdeploy.errors import UnknownName

BY_KEY: dict[str, Method] = {m.key: m for m in DEFAULT_METHODS}
HEAD_KEYS: tuple[str, ...] = tuple(m.key for m in DEFAULT_METHODS if m.kind == "head")


def default_heads(adapter: str) -> tuple[str, ...]:
    """The head methods `bench accuracy` runs on a bundle of this adapter kind by default."""
    from fsdeploy.adapters import ADAPTERS

    kind = ADAPTERS.get(adapter)
    return kind.default_heads or ADAPTERS.get("none").default_heads


def finetune_keys() -> tuple[str, ...]:
    """Cost-table keys of the per-task fine-tuners and their variants (tsa, tsa-seen, bn-affine, ...)."""
    from fsdeploy.adapters import finetuner_methods

    return tuple(finetuner_methods())



def regime(key: str) -> str:
    """Where a cost-table method sits in the adaptation-cost comparison: 'fine-tuner' (backbone or adapter
    weights trained per task or per dataset), 'UpperCaSE' (CaSE blocks + the linear head), else 'meta-learner'
    (a head on frozen features, meta-learned or not: ProtoNet, SimpleShot, baselines, ...)."""
    m = BY_KEY.get(key)
    if key in finetune_keys() or (m is not None and m.kind in ("finetune", "tsa", "toast")):
        return "fine-tuner"
    if m is not None and m.kind == "case":
        return "UpperCaSE" if m.head == "linear" else "meta-learner"
    return "meta-learner"


def parse_keys(text: str | None, adapter: str) -> tuple[str, ...]:
    """Comma-separated head-method keys, or the adapter's defaults when `text` is empty.

    Raises:
        UnknownName: a key that is not a head method of the cost table.
    """
    if not text:
        return default_heads(adapter)
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    known = (*HEAD_KEYS, *finetune_keys())
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UnknownName(f"unknown head method(s) or fine-tuner(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return keys


def method_key(key: str, adapter: str) -> str:
    """The cost-table key of head method `key` run on a bundle with this adapter kind."""
    from fsdeploy.adapters import ADAPTERS

    return ADAPTERS.get(adapter).head_methods.get(key, key if adapter == "none" else f"{adapter}-{key}")


def method_label(key: str, adapter: str) -> str:
    """The cost-table label of head method `key` on this adapter kind (e.g. 'CaSE + linear (UpperCaSE)')."""
    full = method_key(key, adapter)
    if full in BY_KEY:
        return BY_KEY[full].label
    return f"{adapter} + {BY_KEY[key].label}"


def accuracy_methods(keys: Sequence[str], adapter: str) -> list[AccuracyMethod]:
    """accuracy.Method per method key, labelled as in the cost table for this adapter kind; a per-task
    fine-tuner's key (tsa, bn-affine) becomes a fine-tuner method with the cost table's steps."""
    from fsdeploy.adapters import finetuner_methods

    tuners = finetuner_methods()
    out = []
    for k in keys:
        m = BY_KEY[k]
        if k in tuners:
            kind, opts = tuners[k]
            out.append(AccuracyMethod(m.label, adapter=kind, steps=m.steps, opts=opts))
        else:
            out.append(AccuracyMethod(method_label(k, adapter), m.head, m.transform, dict(m.head_opts)))
    return out


def adaptation_specs(keys: Sequence[str]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(key, head, transform, head options) per method for `measure.adaptation_times`."""
    out = []
    for k in keys:
        if k in finetune_keys():
            out.append((k, "", "none", {}))
        elif k in BY_KEY and BY_KEY[k].kind == "head":
            m = BY_KEY[k]
            out.append((k, m.head, m.transform, dict(m.head_opts)))
        else:
            raise UnknownName(f"cannot time adaptation of {k!r}; choose from {', '.join((*HEAD_KEYS, *finetune_keys()))}")
    return out


def join_accuracy(cost_rows: Iterable[Any], accuracy_rows: Iterable[Mapping[str, Any]], task: TaskShape) -> list[dict[str, Any]]:
    """Cost rows with `accuracy` and `ci95` of the accuracy row of the same method and task shape.

    An accuracy row matches a cost row when its `method` equals the cost row's label or key, and its
    `ways`/`shots` (when they are numbers) equal the task's. Unmatched rows on either side are left out.
    """
    shots = task.n_support / task.ways
    acc = {}
    for r in accuracy_rows:
        ways, k = r.get("ways"), r.get("shots")
        if isinstance(ways, int) and ways != task.ways or isinstance(k, int) and k != shots:
            continue
        acc[str(r["method"])] = r
    out = []
    for row in cost_rows:
        d = row.as_dict() if hasattr(row, "as_dict") else dict(row)
        match = acc.get(d["label"]) or acc.get(d["method"])
        if match is not None:
            out.append({**d, "accuracy": float(match["accuracy"]), "ci95": float(match["ci95"]),
                        "bundle": match.get("bundle", ""), "regime": regime(d["method"])})
    return out
