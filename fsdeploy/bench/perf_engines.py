"""Target 6 of `fsdeploy bench perf`: fsdeploy's engines against the strongest PyTorch peers, and this CPU's peaks.

Query throughput as target 1 measures it (decode + preprocess + features of real image files, every side
timed in the same interleaved rounds, preprocessing also timed on its own): ONNX Runtime FP32 and OpenVINO
with the plugin's default precision (bf16 where the CPU has it) against PyTorch eager FP32 and PyTorch bf16
autocast with channels_last memory format. Beside them, the matmul peaks that bound any engine on this CPU:
FP32 (numpy's BLAS), bf16 (PyTorch's oneDNN bf16 GEMM and OpenVINO's bf16 MatMul) and int8 (ONNX Runtime's
u8 x s8 MatMulInteger and PyTorch's `_int_mm`), each the best of a few 1024^3 products, so each engine's
achieved GMAC/s can be read against the peak of the arithmetic it uses.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 1024  # square matmul side for the peaks


def _best_gmacs(fn: Callable[[], Any], calls: int, size: int = SIZE) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return size**3 / best / 1e9


def _int8_ort(threads: int, size: int) -> Callable[[], Any]:
    import onnx
    from onnx import TensorProto, helper

    from fsdeploy.engines.ort import OrtEngine, OrtOptions

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]), helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    eng = OrtEngine(model.SerializeToString(), OrtOptions(providers=("CPUExecutionProvider",), threads=threads))
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 256, (size, size), dtype=np.uint8), "b": rng.integers(-128, 128, (size, size), dtype=np.int8)}
    def run() -> Any:
        return eng.session.run(None, feeds)

    run.feeds = feeds  # type: ignore[attr-defined]  # for checking the product
    return run


def _bf16_openvino(threads: int, size: int) -> Callable[[], Any] | None:
    from fsdeploy.deps import available

    if not available("openvino"):
        return None
    import openvino as ov
    import openvino.opset13 as ops

    from fsdeploy.engines.openvino import bf16_capable

    if not bf16_capable():
        return None
    core = ov.Core()
    rng = np.random.default_rng(0)
    a = ops.parameter([size, size], np.float32, name="a")
    model = ov.Model([ops.matmul(a, ops.constant(rng.standard_normal((size, size)).astype(np.float32)), False, False)], [a])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads})
    req, x = compiled.create_infer_request(), rng.standard_normal((size, size)).astype(np.float32)
    return lambda: req.infer({0: x}, share_inputs=True)


def matmul_peaks(threads: int, *, calls: int = 5, size: int = SIZE) -> dict[str, float]:
    """GMAC/s of the fastest square matmul per arithmetic on `threads` threads: fp32, bf16, int8 (and each source)."""
    import torch

    from fsdeploy.bench.perf_measures import fp32_peak_gmacs, threads_for

    out = {"fp32_gmacs_s": fp32_peak_gmacs(threads, size=size, calls=calls)}
    with threads_for(threads, threads):
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randn(size, size, generator=g).to(torch.bfloat16) for _ in range(2))
        out["bf16_torch_gmacs_s"] = _best_gmacs(lambda: x @ y, calls, size)
        ov_bf16 = _bf16_openvino(threads, size)
        out["bf16_openvino_gmacs_s"] = _best_gmacs(ov_bf16, calls, size) if ov_bf16 else float("nan")
        a, b = (torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=g) for _ in range(2))
        out["int8_torch_gmacs_s"] = _best_gmacs(lambda: torch._int_mm(a, b), calls, size)
        out["int8_ort_gmacs_s"] = _best_gmacs(_int8_ort(threads, size), calls, size)
    out["bf16_gmacs_s"] = float(np.nanmax([out["bf16_torch_gmacs_s"], out["bf16_openvino_gmacs_s"]]))
    out["int8_gmacs_s"] = max(out["int8_torch_gmacs_s"], out["int8_ort_gmacs_s"])
    return out


SIDES = ("ort_fp32", "openvino_default", "openvino_bf16_mixed", "torch_fp32", "torch_bf16_cl")
OURS = ("ort_fp32", "openvino_default", "openvino_bf16_mixed")  # fsdeploy's engines; the others are PyTorch peers
PEERS = ("torch_fp32", "torch_bf16_cl")
# the OpenVINO precision each side runs (what table 6b's agreement gate is measured for)
OPENVINO_SIDES = {"openvino_default": "default", "openvino_bf16_mixed": "bf16-mixed"}


def chosen_engine(row: dict[str, Any], passing: set[str]) -> tuple[str, float, float]:
    """The fastest of fsdeploy's sides in `row` that `passing` lets through (the decision-agreement gate, as
    `fsdeploy tune` applies it), with PyTorch eager FP32's model time over its model time (preprocessing taken
    out of both), and its img/s (preprocessing included) over the faster PyTorch peer's."""
    sides = [k for k in OURS if k in passing and f"{k}_ips" in row]
    best = max(sides, key=lambda k: row[f"{k}_ips"])
    return best, row["torch_fp32_model_ms"] / row[f"{best}_model_ms"], row[f"{best}_ips"] / max(row[f"{k}_ips"] for k in PEERS)


def engine_peer_throughput(
    bundle: Any, label: str, images: Sequence[Path], *, batches: Sequence[int], threads: int, iters: int, rounds: int,
) -> list[dict[str, Any]]:
    """Per batch: img/s of each side (preprocessing included), preprocessing alone, and the ratios the target reads."""
    import torch

    from fsdeploy.bench.measure import interleaved
    from fsdeploy.bench.perf_measures import image_macs, threads_for
    from fsdeploy.bench.reference import load_images_torch, timm_transform
    from fsdeploy.data.images import load_checked
    from fsdeploy.engines import EngineOptions
    from fsdeploy.exporters.rebuild import torch_graphs
    from fsdeploy.runtime import feature_path

    pre = bundle.manifest.preprocess
    graphs, transform = torch_graphs(bundle), timm_transform(pre)
    ort = feature_path(bundle, "ort", EngineOptions(threads=threads))
    rows: list[dict[str, Any]] = []
    macs = image_macs(bundle)
    try:
        state = ort.support([load_checked(list(images[:8]), pre)])[1]
        gamma = torch.from_numpy(state["gamma"]) if "gamma" in state else None
        graph = graphs["query"] if gamma is not None else graphs["features"]
        fp32 = graph.module.eval()
        bf16 = _channels_last_copy(graph.module)
        from fsdeploy.engines.openvino import bf16_capable, hint_for_batch

        ov_sides = [k for k in OPENVINO_SIDES if k == "openvino_default" or bf16_capable()]  # bf16-mixed needs bf16
        sides = [k for k in SIDES if not k.startswith("openvino") or k in ov_sides]
        for b in batches:
            ovs = {k: feature_path(bundle, "openvino", EngineOptions(threads=threads, precision=OPENVINO_SIDES[k], hint=hint_for_batch(b)))
                   for k in ov_sides}
            try:
                files = [images[i % len(images)] for i in range(b)]
                args = (gamma,) if gamma is not None else ()

                def torch_fp32(files: list[Path] = files, args: tuple[Any, ...] = args) -> Any:
                    with torch.inference_mode():
                        return fp32(load_images_torch(files, transform), *args)

                def torch_bf16(files: list[Path] = files, args: tuple[Any, ...] = args) -> Any:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                        return bf16(load_images_torch(files, transform).contiguous(memory_format=torch.channels_last), *args)

                fns: dict[str, Callable[[], Any]] = {
                    "ort_fp32": lambda files=files: ort.query(load_checked(files, pre, workers=threads), state),
                    **{k: (lambda files=files, ov=ov: ov.query(load_checked(files, pre, workers=threads), state))
                       for k, ov in ovs.items()},
                    "torch_fp32": torch_fp32, "torch_bf16_cl": torch_bf16,
                    "pre": lambda files=files: load_checked(files, pre, workers=threads),
                    "torch_pre": lambda files=files: load_images_torch(files, transform),  # timm's torchvision transform
                }
                with threads_for(threads):
                    st = interleaved(fns, warmup=2, iters=iters, rounds=rounds, batch=b)
            finally:
                for ov in ovs.values():
                    ov.close()
            ips = {k: st[k].throughput for k in sides}
            # model time per call: the side's time less its own preprocessing (fsdeploy's PIL/numpy path, or timm's)
            model_ms = {k: max(st[k].mean - st["torch_pre" if k in PEERS else "pre"].mean, 1e-9) for k in sides}
            best_ours = max(v for k, v in ips.items() if k in OURS)
            best_peer = max(ips[k] for k in PEERS)
            row: dict[str, Any] = {"model": label, "batch": b, "threads": threads, **{f"{k}_ips": v for k, v in ips.items()},
                                   "pre_ms": st["pre"].mean, "torch_pre_ms": st["torch_pre"].mean,
                                   **{f"{k}_model_ms": v for k, v in model_ms.items()},
                                   "vs_torch_fp32": best_ours / ips["torch_fp32"],
                                   "vs_torch_fp32_model": model_ms["torch_fp32"] / min(v for k, v in model_ms.items() if k in OURS),
                                   "vs_best_peer": best_ours / best_peer}
            for k in sides:  # compute rate after preprocessing, against the peaks
                row[f"{k}_gmacs_s"] = b * macs / 1e6 / model_ms[k]
            rows.append(row)
    finally:
        ort.close()
    return rows


def _channels_last_copy(module: Any) -> Any:
    """The module in channels_last (PyTorch's recommended CPU layout for bf16 convolutions), a copy."""
    import copy

    import torch

    return copy.deepcopy(module).eval().to(memory_format=torch.channels_last)
