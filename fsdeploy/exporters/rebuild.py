"""Rebuild a bundle's PyTorch modules from its manifest and reference weights (the torch engine's source)."""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import build_adapted
from fsdeploy.backbones import BuildRequest
from fsdeploy.bundle import TORCH_WEIGHTS, Bundle
from fsdeploy.deps import require
from fsdeploy.exporters.graphs import AdaptedModel, GraphExport


def rebuild_module(bundle: Bundle) -> AdaptedModel:
    """The bundle's whole adapted torch module (e.g. the CaseNet) with exactly the exported weights, in eval mode."""
    require("torch")
    from safetensors.torch import load_file

    m = bundle.manifest
    request = BuildRequest(m.model, img_size=m.preprocess.input_size[-1], options=dict(m.source.get("options") or {}))
    built = build_adapted(m.adapter, request)
    built.module.load_state_dict(load_file(str(bundle.file(TORCH_WEIGHTS))))
    built.module.eval()
    return built


def torch_graphs(bundle: Bundle) -> dict[str, GraphExport]:
    """The bundle's graphs as torch modules carrying exactly the exported weights (rebuilt on every call;
    `fsdeploy.runtime.open.torch_graphs` caches them per bundle)."""
    return {g.name: g for g in rebuild_module(bundle).graphs}


def torch_model(bundle: Bundle) -> Any:
    """The whole torch module (its block structure names e.g. the partial fine-tuning set)."""
    return rebuild_module(bundle).module
