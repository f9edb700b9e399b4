"""The `case` adapter kind: UpperCaSE (Patacchiola et al., NeurIPS 2022, arXiv 2206.09843).

CaSE blocks adapt the frozen body in one context pass over the support set; γ is an input of the query
graph, so one engine serves every task. The graphs are built by `fsdeploy.exporters.case_graphs`; on the
device `CasePath` runs the exact chunked context pass. Imports are lazy so the registry loads without torch
(the serving environment has none).
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter


def build(request: Any) -> Any:
    from fsdeploy.exporters.case_graphs import build_case

    return build_case(request)


def case_path(bundle: Any, backend: str, options: Any, **kw: Any) -> Any:
    from fsdeploy.runtime.paths import CasePath

    return CasePath(bundle, backend, options, **kw)


def count_case(net: Any, size: int) -> Any:
    """The plain backbone's counts plus CaSE's: query-graph MACs per image, MLP MACs per task, γ length."""
    from dataclasses import replace

    from fsdeploy.adapters.none import count_plain
    from fsdeploy.bench.cost_inputs import measure_case

    return replace(count_plain(net.backbone, size), case=measure_case(net, size))


def case_cost(m: Any, c: Any, task: Any, head: Any, tf: Any) -> Any:
    """UpperCaSE: one context pass of the CaSE backbone over the support set + CaSE MLPs once + head fit."""
    from fsdeploy.bench.costs import BACKWARD_TEXT, Cost, head_text

    n, k, d = task.n_support, task.ways, c.dim
    case = c.case
    head_part = tf(n) + head.fit_macs(n, d, k)
    return Cost(n * case.forward + case.mlp + head_part, case.forward + tf(1) + head.predict_macs(1, d, k),
                case.gamma + head.n_params(d, k), head_part,
                f"1 context pass of the CaSE backbone on the support set + CaSE MLPs + {head_text(m)} fit", BACKWARD_TEXT["case"])


KIND = register_adapter(AdapterKind(
    name="case",
    summary="UpperCaSE: CaSE blocks adapt the body in one context pass (γ is an engine input) + the linear head",
    build=build,
    feature_path=case_path,
    count=count_case,
    cost=case_cost,
    default_heads=("linear",),
    head_methods={"linear": "case-linear"},
    why_missing="needs a CaSE bundle: fsdeploy export MODEL --adapter case",
))
