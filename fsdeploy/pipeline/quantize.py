"""INT8 static quantization of a bundle's features graph, for ONNX Runtime on CPU.

Post-training static quantization after Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018: weights int8 per output channel, activations uint8
with ranges from min/max over real calibration images. The graph stores QuantizeLinear/DequantizeLinear
pairs (QDQ), which ONNX Runtime fuses into integer kernels; ONNX Runtime's own quantizer does the work.

The int8 file sits beside the FP32 graph and is recorded as the graph's int8 `Variant`, not in
`manifest.graphs`, so the bundle id (and every task adapted on it) stays valid. Agreement with FP32 is
measured on held-out images and recorded, never assumed: it depends on the model, and on the CPU that runs
it, since int8 kernels differ (on AVX2 without VNNI, full-range int8 weights can saturate 16-bit sums;
`reduce_range` keeps 7-bit weights that cannot).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fsdeploy.atomic import atomic_path, sha256_file
from fsdeploy.data.folders import list_images
from fsdeploy.data.images import load_checked
from fsdeploy.deps import require
from fsdeploy.errors import InvalidInput
from fsdeploy.bundle import Bundle, Variant, checked_sha256, record_variant, resolve
from fsdeploy.compare import row_cosines
from fsdeploy.engines import EngineOptions, open_engine

CALIB_BATCH = 8  # images per calibration run; ranges are min/max over all runs, so only memory depends on it
MAX_HELD_OUT = 32
MIN_HELD_OUT = 4  # fewer held-out images than this: validate on the calibration images and say so

Say = Callable[[str], None]


@dataclass(frozen=True)
class QuantReport:
    """What was quantized and how closely its features follow FP32 on `validated_on` images."""

    graph: str
    file: str  # int8 graph, relative to the bundle
    source_file: str
    source_sha256: str
    calibration_images: int
    validation_images: int
    validated_on: str  # "held-out" | "calibration"
    reduce_range: bool
    cosine_min: float  # per-image cosine of INT8 vs FP32 features
    cosine_mean: float
    max_abs: float  # max |INT8 - FP32| over all features
    ref_max_abs: float  # max |FP32 feature|: the scale max_abs is read against
    onnxruntime: str
    scheme: str = "QDQ, weights int8 per channel, activations uint8, min/max calibration"
    # centred cosine (features minus the calibration images' mean FP32 feature) on the compared images, and
    # few-shot decision agreement on episodes from the class folders of all images (fsdeploy.agreement);
    # NaN / 0 decisions when the images are not in class folders with enough images each
    centred_cosine_min: float = float("nan")
    centred_cosine_mean: float = float("nan")
    decision_agreement: float = float("nan")
    agreement_decisions: int = 0
    agreement_episodes: int = 0
    int8_kernels: str = ""  # the CPU's INT8 kernel kind the range was chosen for (fsdeploy.pipeline.int8_range)
    range_chosen_by: str = "user"  # "cpu": detected from the CPU flags; "user": --reduce-range / --full-range

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _CalibrationBatches:
    """ONNX Runtime's CalibrationDataReader protocol (`get_next`) over preprocessed images."""

    def __init__(self, images: NDArray[np.float32], input_name: str) -> None:
        self._feeds = iter([{input_name: images[i : i + CALIB_BATCH]} for i in range(0, len(images), CALIB_BATCH)])

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        return next(self._feeds, None)


def split_images(paths: Sequence[Path], max_images: int) -> tuple[list[Path], list[Path]]:
    """Calibration and held-out images, chosen by a fixed-seed shuffle so both span every class folder.

    A quarter of the images (at most MAX_HELD_OUT) is held out when that gives at least MIN_HELD_OUT;
    otherwise the held-out list is empty and validation falls back to the calibration images.
    """
    if max_images < 1:
        raise InvalidInput(f"--images must be >= 1, got {max_images}")
    order = np.random.default_rng(0).permutation(len(paths))
    shuffled = [Path(paths[i]) for i in order]
    held = min(MAX_HELD_OUT, len(shuffled) // 4)
    held = held if held >= MIN_HELD_OUT else 0
    n_cal = min(max_images, len(shuffled) - held)
    return shuffled[:n_cal], shuffled[n_cal : n_cal + held]


def _check_quantizable(bundle: Bundle, graph: str) -> tuple[str, str]:
    """The graph's file and input name; refuses bundles whose features need task state."""
    m = bundle.manifest
    if m.adapter != "none":
        raise InvalidInput(
            f"int8 is offered for adapter none bundles; this bundle uses {m.adapter} — quantize a bundle exported with --adapter none"
        )
    bundle.graph_path(graph)  # names the graphs there are when `graph` is not one
    rel = m.graphs[graph].file
    inputs = list(m.graphs[graph].inputs)
    if len(inputs) != 1:
        raise InvalidInput(f"graph {graph!r} has inputs {', '.join(inputs)}; int8 calibration feeds one image input")
    checked_sha256(bundle, rel)
    return rel, inputs[0]


def _features(onnx_path: Path, input_name: str, images: NDArray[np.float32]) -> NDArray[np.float32]:
    """The graph's (first) output for `images`, run in calibration-sized batches."""
    with open_engine(onnx_path, "ort", EngineOptions(providers=("CPUExecutionProvider",), cpu_arena=False)) as engine:
        batches = [next(iter(engine.run({input_name: images[i : i + CALIB_BATCH]}).values())) for i in range(0, len(images), CALIB_BATCH)]
        return np.concatenate(batches)


def _quantize_file(src: Path, dst: Path, images: NDArray[np.float32], input_name: str, *, reduce_range: bool, work: Path) -> None:
    """Shape-infer and fold `src` (ONNX Runtime's recommended pre-pass), then calibrate and write QDQ `dst`."""
    quant = require("onnxruntime.quantization")
    shape_inference = require("onnxruntime.quantization.shape_inference")
    prepared = work / "prepared.onnx"
    shape_inference.quant_pre_process(str(src), str(prepared))
    quant.quantize_static(
        str(prepared),
        str(dst),
        _CalibrationBatches(images, input_name),
        quant_format=quant.QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=quant.QuantType.QUInt8,
        weight_type=quant.QuantType.QInt8,
        # MinMax keeps only per-tensor min/max per batch, so memory stays small without ORT's
        # CalibMaxIntermediateOutputs, which (onnxruntime 1.32) drops the batches it flushes instead of merging them.
        calibrate_method=quant.CalibrationMethod.MinMax,
    )


def quantize_bundle(
    bundle: Bundle,
    calib_images: list[Path],
    *,
    graph: str = "features",
    max_images: int = 64,
    reduce_range: bool | None = None,
    say: Say | None = None,
) -> QuantReport:
    """Write an INT8 version of `graph` into the bundle, calibrated and validated on real images.

    The bundle is unchanged unless everything succeeds; re-quantizing replaces the previous int8 graph.

    Args:
        bundle: a loaded bundle with adapter "none".
        calib_images: image files or folders (searched recursively), preprocessed as the bundle says.
        graph: the graph to quantize.
        max_images: at most this many images calibrate; others (up to a quarter) are held out to validate.
        reduce_range: 7-bit weights, which avoid int16 saturation in the u8 x s8 kernels of CPUs without VNNI;
            None picks from this CPU's flags (full range with VNNI / AMX, `fsdeploy.pipeline.int8_range`).
        say: progress messages.

    Returns:
        The report, also stored as the int8 variant's `info`.

    Raises:
        InvalidInput: another adapter, no images, or unreadable images (all named).
        BundleError: the FP32 graph changed since export.
    """
    from fsdeploy.pipeline.int8_range import int8_kernels

    say = say or (lambda _msg: None)
    kernels = int8_kernels()
    chosen_by = "user" if reduce_range is not None else "cpu"
    reduce_range = (not kernels.full_range) if reduce_range is None else reduce_range
    src_rel, input_name = _check_quantizable(bundle, graph)
    try:
        paths = list_images(list(calib_images))
    except InvalidInput as exc:
        raise InvalidInput(f"{exc}; calibration needs real images like those the model will serve (about 64)") from None
    cal_paths, held_paths = split_images(paths, max_images)
    pre = bundle.manifest.preprocess
    workers = os.cpu_count() or 1
    say(f"loading {len(cal_paths)} calibration + {len(held_paths)} held-out images")
    cal = load_checked(cal_paths, pre, workers=workers)
    held = load_checked(held_paths, pre, workers=workers) if held_paths else cal
    ort_version = require("onnxruntime").__version__
    src = bundle.file(src_rel)
    with tempfile.TemporaryDirectory(prefix="fsdeploy-int8-") as tmp:
        work = Path(tmp)
        quantized = work / "int8.onnx"
        say(f"calibrating {src_rel} on {len(cal)} images")
        _quantize_file(src, quantized, cal, input_name, reduce_range=reduce_range, work=work)
        say(f"comparing INT8 with FP32 on {len(held)} {'held-out' if held_paths else 'calibration'} images")
        ref = _features(src, input_name, held)
        got = _features(quantized, input_name, held)
        cos = row_cosines(got, ref)
        agree = _agreement(src, quantized, input_name, cal, held if held_paths else None, cal_paths + held_paths, ref, got)
        digest = sha256_file(quantized)
        report = QuantReport(
            graph=graph,
            file=f"{Path(src_rel).stem}.int8.{digest[:12]}.onnx",
            source_file=src_rel,
            source_sha256=bundle.manifest.files[src_rel],
            calibration_images=len(cal),
            validation_images=len(held),
            validated_on="held-out" if held_paths else "calibration",
            reduce_range=reduce_range,
            cosine_min=float(cos.min()),
            cosine_mean=float(cos.mean()),
            max_abs=float(np.abs(got.astype(np.float64) - ref).max()),
            ref_max_abs=float(np.abs(ref).max()),
            onnxruntime=ort_version,
            int8_kernels=kernels.isa,
            range_chosen_by=chosen_by,
            **agree,
        )
        _commit(bundle, quantized, report, digest)
    say(f"wrote {report.file}")
    return report


def _agreement(
    src: Path, quantized: Path, input_name: str, cal: NDArray[np.float32], held: NDArray[np.float32] | None,
    paths: Sequence[Path], ref_held: NDArray[np.float32], got_held: NDArray[np.float32],
) -> dict[str, Any]:
    """Centred cosine on the compared images (centred on the calibration images' mean FP32 feature) and
    decision agreement on episodes over every image, labelled by its folder."""
    from fsdeploy.agreement import agreement_of_features, centred_cosines

    ref_cal = _features(src, input_name, cal)
    cc = centred_cosines(got_held, ref_held, ref_cal.astype(np.float64).mean(0))
    out: dict[str, Any] = {"centred_cosine_min": float(cc.min()), "centred_cosine_mean": float(cc.mean())}
    names = [p.parent.name for p in paths]
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names], dtype=np.int64)
    got_cal = _features(quantized, input_name, cal)
    ref_all = ref_cal if held is None else np.concatenate([ref_cal, ref_held])
    got_all = got_cal if held is None else np.concatenate([got_cal, got_held])
    for shots in (5, 1):  # 5-shot where the folders have the images, else 1-shot
        try:
            a = agreement_of_features(got_all, ref_all, labels, shots=shots, episodes=100)
        except InvalidInput:
            continue
        out.update(decision_agreement=a.decision_agreement, agreement_decisions=a.decisions, agreement_episodes=a.episodes)
        break
    return out


def _commit(bundle: Bundle, quantized: Path, report: QuantReport, digest: str) -> None:
    """Copy the int8 file in, then record it as the graph's int8 variant: the manifest's atomic replace is the
    commit point.

    The file name carries its hash, so the new file never overwrites the one the old manifest lists; a
    failure before the manifest is written removes the new file, and the old one is deleted only after.
    """
    target = bundle.file(report.file)
    with atomic_path(target, suffix=".onnx") as tmp:
        shutil.copyfile(quantized, tmp)
    variant = Variant(report.file, report.graph, "onnx", "int8", report.source_sha256, digest, report.to_dict())
    try:
        _, dropped = record_variant(bundle, variant, supersedes=lambda v: v.kind == "onnx" and v.precision == "int8")
    except BaseException:
        if not bundle.manifest.variants.get(report.file):
            target.unlink(missing_ok=True)
        raise
    for rel in dropped:
        bundle.file(rel).unlink(missing_ok=True)


def int8_graph_path(bundle: Bundle, graph: str) -> Path:
    """The int8 file of `graph` (see `fsdeploy.bundle.resolve`).

    Raises:
        BundleError: the bundle has no int8 graph for `graph`, or it was made from another FP32 graph.
    """
    source = resolve(bundle, graph, "int8", "onnx")
    assert source.path is not None
    return source.path
