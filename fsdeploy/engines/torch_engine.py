"""PyTorch eager backend: the numerical reference every exported graph is validated against."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fsdeploy.bundle.manifest import TensorSpec
from fsdeploy.bundle.sources import GraphSource
from fsdeploy.deps import require
from fsdeploy.engines import EngineOptions, register_backend
from fsdeploy.engines.base import UNKNOWN_SHAPE, Engine
from fsdeploy.errors import InvalidInput


class TorchEngine(Engine):
    """Run an nn.Module whose positional inputs/outputs are named by `input_specs`/`output_names`."""

    def __init__(
        self,
        module: Any,
        inputs: dict[str, TensorSpec],
        output_names: Sequence[str],
        *,
        device: str | None = None,
        threads: int | None = None,
        outputs: dict[str, TensorSpec] | None = None,
    ) -> None:
        torch = require("torch")
        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.module = module.to(self.device).eval()
        self._inputs = dict(inputs)
        self._output_names = tuple(output_names)
        self._outputs = dict(outputs or {})  # the exported graph's output signature, when the source knows it
        self.name = f"torch[{self.device}]:{type(module).__name__}"

    def input_specs(self) -> dict[str, TensorSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, TensorSpec]:
        return {n: self._outputs.get(n, TensorSpec(UNKNOWN_SHAPE)) for n in self._output_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = require("torch")
        args = [torch.from_numpy(feeds[n]).to(self.device) for n in self._inputs]
        with torch.inference_mode():
            out = self.module(*args)
        if not isinstance(out, (tuple, list)):
            out = (out,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self._output_names, out)}


@register_backend("torch", "torch", ("fp32",), summary="PyTorch eager: the exported module itself, the numerical reference")
def _open_torch(source: GraphSource, options: EngineOptions) -> Engine:
    if source.torch is None:
        raise InvalidInput(f"{source.describe()} carries no torch module; open bundle graphs with fsdeploy.runtime.open_graph")
    module = source.torch.module
    if not isinstance(module, require("torch").nn.Module) and callable(module):
        module = module()  # a lazy loader (the runtime caches the rebuilt module per bundle)
    inputs = {name: source.inputs[name] for name in source.torch.input_order} if source.inputs else {
        name: TensorSpec(UNKNOWN_SHAPE) for name in source.torch.input_order}
    return TorchEngine(module, inputs, source.torch.outputs, device=options.device, threads=options.threads,
                       outputs=source.outputs or None)
