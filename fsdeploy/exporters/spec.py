"""Export specifications as plain values: input/output names, dynamic axes, opset, tolerance.

Variants differ through `dataclasses.replace`, never through subclasses or copied functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_OPSET = 17  # LayerNormalization is a single ONNX node from opset 17 on


@dataclass(frozen=True)
class ExportSpec:
    """How one graph is exported and how closely ONNX Runtime must match PyTorch.

    Args:
        inputs: input name -> {axis: dynamic axis name}; order is the module's positional order.
        outputs: output names, in the module's return order.
        opset: ONNX opset.
        atol: max-abs tolerance per output against PyTorch (FP32).
        rtol: plus this fraction of the output's max |value| (see `ValidationReport`).
        dynamo: use the torch.export-based exporter (slower to export; the TorchScript exporter is
            the default because it exports these CNN/ViT graphs in ~1 s with identical numerics).
    """

    inputs: dict[str, dict[int, str]] = field(default_factory=lambda: {"images": {0: "batch"}})
    outputs: tuple[str, ...] = ("features",)
    output_axes: dict[str, dict[int, str]] = field(default_factory=lambda: {"features": {0: "batch"}})
    opset: int = DEFAULT_OPSET
    atol: float = 1e-4
    rtol: float = 1e-4
    dynamo: bool = False
