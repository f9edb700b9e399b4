"""The graphs of a CaSE bundle (UpperCaSE): a CaseNet and every graph export writes for it.

UpperCaSE: Patacchiola et al., NeurIPS 2022 (arXiv 2206.09843).

Graphs, in bundle order:
- `context`: images `(N,3,H,W)` → features `(N,D)`, gamma `(G,)` — one batch is the whole support set.
- `query`: images `(B,3,H,W)`, gamma `(G,)` (static length) → features `(B,D)`.
- `case_gamma`: means `(G,)` → gamma `(G,)`, the CaSE excitations for the chunked scheme.
- `stage_00` … `stage_K`: the chunked context scheme (see `fsdeploy.runtime.case_pass`).

Checkpoints: plain or metatrain (`fsdeploy.modules.case_checkpoint`). On the device, `CasePath` runs the
context pass (support set -> γ) and the query graph with γ as an input, so one engine serves every task.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fsdeploy.backbones import BuildRequest, Preprocess
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport, images_only
from fsdeploy.exporters.spec import ExportSpec
from fsdeploy.modules.case_checkpoint import build_casenet
from fsdeploy.modules.casenet import CaseNet, Stage, run_stages_torch

SCHEME = "case-stages/1"  # version of the chunked-scheme contract recorded in the manifest

Feeds = Callable[[np.ndarray], dict[str, np.ndarray]]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _TorchChain:
    """Torch reference inputs of every graph for one image batch, computed once per batch.

    Validation asks each of the K + 4 graphs for its feeds on the same batches; running the stage chain
    once per batch instead of once per stage keeps that linear in K.
    """

    def __init__(self, net: CaseNet, keep: int = 4) -> None:
        self.net = net
        self.keep = keep  # validation alternates between input sets, so remember a few batches
        self._memo: dict[tuple[Any, ...], dict[str, Any]] = {}

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        key = (images.shape, images.dtype.str, hash(np.ascontiguousarray(images).tobytes()))
        if key not in self._memo:
            if len(self._memo) >= self.keep:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = self._compute(torch.from_numpy(images))
        return self._memo[key]

    def _compute(self, x: torch.Tensor) -> dict[str, Any]:
        with torch.inference_mode():
            _, gamma = self.net(x)
            stages = self.net.stages()
            inputs: list[tuple[torch.Tensor, ...]] = [(x,)]
            state = stages[0].module(x)[1:]
            for stage in stages[1:]:
                inputs.append((*state, gamma))
                out = stage.module(*state, gamma)
                state = out[1:] if isinstance(out, tuple) else ()
        _, _, means = run_stages_torch(self.net, [x])
        return {"gamma": gamma, "stage_inputs": inputs, "means": means}


def _query_feeds(chain: _TorchChain) -> Feeds:
    return lambda images: {"images": images, "gamma": _to_numpy(chain(images)["gamma"])}


def _gamma_feeds(chain: _TorchChain) -> Feeds:
    return lambda images: {"means": _to_numpy(chain(images)["means"])}


def _stage_feeds(chain: _TorchChain, stage: Stage, k: int) -> Feeds:
    """Inputs of stage k for `images`: stages 0..k-1 run in torch under the one-batch context γ."""
    return lambda images: {n: _to_numpy(t) for n, t in zip(stage.inputs, chain(images)["stage_inputs"][k])}


def stage_state_floats(net: CaseNet, stages: list[Stage], size: int) -> list[int]:
    """Floats per image held between stage k and k+1 (the carried state plus `pooled`), at `size` px."""
    out = []
    with torch.inference_mode():
        p = next(net.parameters())
        gamma = torch.ones(net.gamma_size, dtype=p.dtype, device=p.device)
        state: tuple[torch.Tensor, ...] = (torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device),)
        for k, stage in enumerate(stages[:-1]):
            res = stage.module(*state) if k == 0 else stage.module(*state, gamma)
            out.append(int(sum(t.numel() for t in res)))
            state = tuple(res[1:])
    return out


def case_graphs(net: CaseNet) -> tuple[tuple[GraphExport, ...], list[Stage]]:
    """Every graph of a CaSE bundle, `context` first (export reads feature_dim from its `features`)."""
    batch = {0: "batch"}
    chain = _TorchChain(net)
    graphs = [
        GraphExport(
            "context", net.deploy_context_module(),
            ExportSpec(inputs={"images": batch}, outputs=("features", "gamma"), output_axes={"features": batch}),
            images_only,
            reference=net.context_module(),
        ),
        GraphExport(
            "query", net.deploy_query_module(),
            ExportSpec(inputs={"images": batch, "gamma": {}}, outputs=("features",), output_axes={"features": batch}),
            _query_feeds(chain),
            reference=net.query_module(),
        ),
        GraphExport(
            "case_gamma", net.gamma_module(),
            ExportSpec(inputs={"means": {}}, outputs=("gamma",), output_axes={}),
            _gamma_feeds(chain),
        ),
    ]
    stages = net.stages()
    for k, stage in enumerate(stages):
        spec = ExportSpec(
            inputs={n: ({} if n == "gamma" else batch) for n in stage.inputs},
            outputs=stage.outputs,
            output_axes={n: batch for n in stage.outputs},
        )
        graphs.append(GraphExport(stage_name(k), stage.module, spec, _stage_feeds(chain, stage, k)))
    return tuple(graphs), stages


def stage_name(k: int) -> str:
    """Graph name of chunked stage k."""
    return f"stage_{k:02d}"


def case_extra(net: CaseNet, stages: list[Stage], pre: Preprocess) -> dict[str, Any]:
    """What the runtime needs from the manifest: γ layout and the chunked scheme's graphs."""
    return {
        "gamma_layout": [s.to_dict() for s in net.layout],
        "gamma_size": net.gamma_size,
        "case_family": net.family,
        "case_params": int(sum(p.numel() for p in net.cases.parameters())),
        "chunked": {
            "scheme": SCHEME,
            "gamma_graph": "case_gamma",
            "stages": [stage_name(k) for k in range(len(stages))],
            "state_floats_per_image": stage_state_floats(net, stages, pre.input_size[-1]),
        },
    }


def build_case(request: BuildRequest) -> AdaptedModel:
    """UpperCaSE: frozen backbone + CaSE blocks; context/query graphs plus the exact chunked context scheme."""
    net, pre = build_casenet(request)
    graphs, stages = case_graphs(net)
    return AdaptedModel(net, pre, graphs, case_extra(net, stages, pre))
