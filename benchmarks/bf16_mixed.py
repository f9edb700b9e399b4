"""Issue #21 target 6b: why OpenVINO bf16 loses decisions on the shipped glyph backbone, and `bf16-mixed`.

Three parts, all against ONNX Runtime FP32 on novel-class glyph images:

1. `--diagnose`: the worst images under plain bf16 (centred cosine), and which part of the network must stay
   f32 to repair them: the graph is compiled at bf16 with one region's layers kept f32 through OpenVINO's
   `DisablePrecisionConversion` mark (`fsdeploy.engines.openvino.mark_f32`), region by region -- the stem and
   early blocks, the late blocks whose BatchNorm channels have near-zero running variance, and so on.
2. Decision agreement of bf16 and bf16-mixed, 1- and 5-shot, exactly as `fsdeploy bench perf --targets 6`
   measures table 6b (the same episodes and images, both glyph bundles).
3. Speed: bf16, bf16-mixed, OpenVINO f32 and ORT FP32 features, timed interleaved in one process, on the glyph
   backbone at 32 px and on efficientnet_b0 at 224 px (random init; speed does not depend on the values).

Usage:
    python benchmarks/bf16_mixed.py --data data/glyphs [--workdir fsdeploy-perf] [--diagnose]

Writes benchmarks/results/bf16_mixed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def diagnose(bundle: Any, corpus: Path, classes: list[str] | None, threads: int) -> dict[str, Any]:
    """Worst images under bf16, and the centred cosine / 1-shot agreement with one region at a time kept f32."""
    import openvino as ov

    from fsdeploy.agreement import agreement_of_features, centred_cosines
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked
    from fsdeploy.engines.openvino import mark_f32
    from fsdeploy.engines.ort import OrtEngine

    files = scan_image_folder(corpus, classes=classes)
    if len(files) > 1000:  # the draw `fsdeploy tune` makes (max_images=1000)
        files = files.subset(np.sort(np.random.default_rng(0).choice(len(files), 1000, replace=False)))
    x = load_checked(files.paths, bundle.manifest.preprocess)
    graph = bundle.graph_path("features")
    with OrtEngine(graph) as ort:
        ref = np.concatenate([ort.run({"images": x[i : i + 32]})["features"] for i in range(0, len(x), 32)])
    mean = ref.astype(np.float64).mean(0)
    core = ov.Core()
    model = core.read_model(str(graph))
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Result", "Constant")]
    regions = {
        "none (plain bf16)": [],
        "stem": ["/conv_stem/", "/bn1/"],
        "stem + block 0": ["/conv_stem/", "/bn1/", "/blocks.0/"],
        "stem + blocks 0-1": ["/conv_stem/", "/bn1/", "/blocks.0/", "/blocks.1/"],
        "stem + blocks 0-2": ["/conv_stem/", "/bn1/", "/blocks.0/", "/blocks.1/", "/blocks.2/"],
        "stem + blocks 0-3": ["/conv_stem/", "/bn1/", "/blocks.0/", "/blocks.1/", "/blocks.2/", "/blocks.3/"],
        "blocks 4-6 (near-zero-variance BN)": ["/blocks.4/", "/blocks.5/", "/blocks.6/"],
        "conv_head": ["/conv_head/", "/bn2/"],
        "everything": ["/"],
    }
    rows, worst = [], None
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.xml"
        ov.save_model(model, str(base), compress_to_fp16=False)
        text = base.read_text(encoding="utf-8")
        for label, parts in regions.items():
            names = {op.get_friendly_name() for op in ops if any(p in op.get_friendly_name() for p in parts)}
            if "/bn1/" in parts:  # the stem's BN only, not every block's bn1
                names = {n for n in names if not re.search(r"/blocks\.\d+/.*/bn1/", n) or any(p in n for p in parts if p.startswith("/blocks"))}
            marked, count = mark_f32(text, names)
            xml = Path(tmp) / "marked.xml"
            xml.write_text(marked, encoding="utf-8")
            os.replace(base.with_suffix(".bin"), xml.with_suffix(".bin"))
            try:
                compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads})
                req = compiled.create_infer_request()
                got = np.concatenate([req.infer({0: x[i : i + 32]})[compiled.outputs[0]].copy() for i in range(0, len(x), 32)])
            except RuntimeError as exc:  # OpenVINO 2026.4 fails on some partial marks (a conv with a fused sum)
                rows.append({"kept_f32": label, "layers": count, "error": " | ".join(str(exc).split("\n")[-2:])[-200:]})
                continue
            finally:
                os.replace(xml.with_suffix(".bin"), base.with_suffix(".bin"))
            cc = centred_cosines(got, ref, mean)
            if worst is None:
                plain_cc = cc
                order = np.argsort(cc)[:8]
                worst = [{"image": str(Path(files.paths[i]).relative_to(corpus)), "centred_cosine": float(cc[i])} for i in order]
            a1 = agreement_of_features(got, ref, files.labels, shots=1, queries=5, episodes=200, seed=1, mean=mean)
            rows.append({"kept_f32": label, "layers": count, "centred_cosine_mean": float(cc.mean()), "centred_cosine_min": float(cc.min()),
                         "worst_image_cosine": float(cc[order[0]]), "decisions_1shot": a1.decision_agreement})
            print(rows[-1], flush=True)
    cc0 = next(r for r in rows if r["kept_f32"].startswith("none"))
    order = [int(i) for i in np.argsort(plain_cc)]
    probe = layer_probe(bundle, x, order[:4], order[400:440], threads)
    return {"images": len(x), "worst_under_bf16": worst, "regions": rows, "plain": cc0, "layer_probe": probe}


def layer_probe(bundle: Any, x: np.ndarray, worst: list[int], typical: list[int], threads: int) -> list[dict[str, Any]]:
    """Relative L2 error of bf16 against f32 activations, layer by layer, for the worst and for typical images.

    Every convolution / add / multiply output becomes a model output, compiled once at f32 and once at bf16.
    Indicative only: the CPU plugin keeps the ops just before an output in f32, so with every layer an output
    more of the graph runs f32 than in the deployed model; the region sweep of `diagnose` is the causal test.
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(bundle.graph_path("features")))
    keep = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "Add", "Multiply")]
    model.add_outputs([op.output(0) for op in keep])
    outs = {}
    for prec in ("f32", "bf16"):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": prec, "INFERENCE_NUM_THREADS": threads})
        res = compiled.create_infer_request().infer({0: x[worst + typical]})
        outs[prec] = [np.asarray(res[compiled.outputs[i + 1]], np.float64).reshape(len(worst) + len(typical), -1) for i in range(len(keep))]
    rows = []
    for i, op in enumerate(keep):
        a, c = outs["f32"][i], outs["bf16"][i]
        rel = np.linalg.norm(c - a, axis=1) / (np.linalg.norm(a, axis=1) + 1e-30)
        rows.append({"layer": op.get_friendly_name(), "type": op.get_type_name(), "worst": [float(v) for v in rel[: len(worst)]],
                     "typical_median": float(np.median(rel[len(worst):]))})
    return rows


def bn_gains(checkpoint: Path, top: int = 8) -> list[dict[str, Any]]:
    """BatchNorm channels with the largest |gamma| / sqrt(running_var + eps) (what folding puts into the conv)."""
    from safetensors.numpy import load_file

    w = load_file(str(checkpoint))
    rows = []
    for k, var in w.items():
        if k.endswith("running_var"):
            p = k[: -len("running_var")]
            gain = np.abs(w[p + "weight"]) / np.sqrt(var + 1e-5)
            rows.append({"bn": p.rstrip("."), "max_gain": float(gain.max()), "channels_over_100": int((gain > 100).sum()),
                         "min_running_var": float(var.min())})
    return sorted(rows, key=lambda r: -r["max_gain"])[:top]


def speed(bundles: dict[str, Any], threads: int, batches: tuple[int, ...]) -> list[dict[str, Any]]:
    from fsdeploy.bench.measure import interleaved
    from fsdeploy.engines import EngineOptions
    from fsdeploy.runtime import open_graph

    rows = []
    for label, b in bundles.items():
        size = b.manifest.preprocess.input_size[-1]
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            sides = {"ort fp32": ("ort", "fp32"), "openvino f32": ("openvino", "fp32"), "openvino bf16": ("openvino", "bf16"),
                     "openvino bf16-mixed": ("openvino", "bf16-mixed")}
            hint = "latency" if batch == 1 else "throughput"
            engines = {k: open_graph(b, "features", be, EngineOptions(threads=threads, precision=p, hint=None if be == "ort" else hint))
                       for k, (be, p) in sides.items()}
            stats = interleaved({k: (lambda e=e: e.run({"images": x})) for k, e in engines.items()}, warmup=3, iters=40, rounds=5, batch=batch)
            for e in engines.values():
                e.close()
            ref = stats["ort fp32"].median
            for k, s in stats.items():
                rows.append({"model": label, "batch": batch, "engine": k, "median_ms": s.median, "p90_ms": s.p90, "vs_ort_fp32": ref / s.median})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the glyph corpus (fsdeploy data glyphs)")
    ap.add_argument("--workdir", type=Path, default=Path("fsdeploy-perf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diagnose", action="store_true", help="also the worst images and the region-by-region f32 sweep")
    ap.add_argument("--out", type=Path, default=RESULTS / "bf16_mixed.json")
    args = ap.parse_args()

    from fsdeploy.bench.perf import PerfConfig, _decision_agreement, _Run
    from fsdeploy.bench.workspace import split_classes
    from fsdeploy.weights import DEFAULT_IMG_SIZE, DEFAULT_MODEL, default_checkpoint

    cfg = PerfConfig(workdir=args.workdir, targets=(6,), threads=args.threads, data=args.data)
    run = _Run(cfg, print)
    out: dict[str, Any] = {"bn_gains": bn_gains(default_checkpoint())}
    glyph = run.bundle(DEFAULT_MODEL, size=DEFAULT_IMG_SIZE)
    if args.diagnose:
        out["diagnosis"] = diagnose(glyph, args.data, split_classes(args.data, cfg.split), args.threads)
    out["agreement_6b"] = _decision_agreement(run)
    for r in out["agreement_6b"]:
        print(r, flush=True)
    out["speed"] = speed({f"{DEFAULT_MODEL} (glyph, {DEFAULT_IMG_SIZE} px)": glyph, f"{DEFAULT_MODEL} (224 px)": run.bundle(DEFAULT_MODEL, size=224)},
                         args.threads, (1, 16))
    out["notes"] = run.report.notes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
