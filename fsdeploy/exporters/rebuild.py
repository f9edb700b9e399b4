"""Rebuild a bundle's PyTorch modules from its manifest and reference weights (for the torch engine)."""
from __future__ import annotations

from fsdeploy.deps import require
from fsdeploy.exporters.bundle import TORCH_WEIGHTS, Bundle
from fsdeploy.exporters.graphs import BuildRequest, GraphExport, build_adapted


def torch_graphs(bundle: Bundle) -> dict[str, GraphExport]:
    """The bundle's graphs as torch modules carrying exactly the exported weights."""
    require("torch")
    from safetensors.torch import load_file

    m = bundle.manifest
    request = BuildRequest(m.model, img_size=m.preprocess.input_size[-1], options=dict(m.source.get("options") or {}))
    built = build_adapted(m.adapter, request)
    built.module.load_state_dict(load_file(str(bundle.file(TORCH_WEIGHTS))))
    built.module.eval()
    return {g.name: g for g in built.graphs}
