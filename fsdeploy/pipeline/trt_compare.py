"""`fsdeploy compare`: TensorRT engines against ONNX Runtime on the same real-image inputs, every output."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from fsdeploy.bundle import Bundle
from fsdeploy.compare import CompareReport, Tolerance, compare
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import EngineError

# FP32: TF32 is off in fsdeploy's builds, so only summation order differs. FP16: ~3 decimal digits per value.
TOLERANCES = {"fp32": Tolerance(1e-3, 0.0, 0.9999), "fp16": Tolerance(1e-2, 1e-2, 0.999)}


def compare_bundle(
    bundle: Bundle,
    *,
    precision: str = "fp32",
    n: int = 8,
    seed: int = 0,
    graphs: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompareReport:
    """Run ONNX Runtime (FP32 graph) and TensorRT on the same real-image inputs and compare every output.

    Inputs are `n` crops of the photos shipped with matplotlib; graphs with more inputs than images
    (CaSE query, stages) get theirs from the bundle's PyTorch modules, as export validation does.

    Raises:
        EngineError / BundleError: as opening the graph on 'trt' (no GPU, no engine, stale or corrupt engine).
    """
    from fsdeploy.data.samples import real_batch
    from fsdeploy.engines.trt_backend import gpu_present
    from fsdeploy.runtime.open import open_graph, torch_graphs

    say = progress or (lambda _msg: None)
    if not gpu_present():
        raise EngineError("`compare` runs TensorRT engines and needs a CUDA GPU; none is visible here (engines can still be built)")
    names = list(graphs) if graphs else list(bundle.manifest.graphs)
    images = real_batch(bundle.manifest.preprocess, n, np.random.default_rng(seed))
    modules = torch_graphs(bundle)
    checks = []
    for g in names:
        say(f"{g}: ONNX Runtime vs TensorRT {precision}")
        feeds = modules[g].feeds(images)
        with open_graph(bundle, g, "ort", EngineOptions(providers=("CPUExecutionProvider",))) as ort_engine:
            want = ort_engine.run(feeds)
        with open_graph(bundle, g, "trt", EngineOptions(precision=precision, batch=n)) as trt_engine:
            got = trt_engine.run(feeds)
        checks += [replace(c, centred_cosine=_centred(got.get(c.name), want[c.name])) for c in compare(g, "real", got, want)]
    return CompareReport(tuple(checks), TOLERANCES[precision], what=f"TensorRT {precision} vs ONNX Runtime (batch {n})")


def _centred(got: np.ndarray | None, want: np.ndarray) -> float:
    """Min centred cosine of per-image feature rows `(N, D)`, N > 1; NaN for other outputs."""
    from fsdeploy.agreement import centred_cosines

    if got is None or got.shape != want.shape or want.ndim != 2 or len(want) < 2:
        return float("nan")
    return float(centred_cosines(got, want).min())
