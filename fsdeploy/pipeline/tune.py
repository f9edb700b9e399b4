"""Choose the engine and precision for this machine from evidence: speed on the user's images, gated by agreement.

`tune_bundle` runs every engine x precision available here (ONNX Runtime fp32 / int8, OpenVINO fp32 / bf16 /
bf16-mixed / int8, PyTorch fp32) on a folder of the user's images: query latency at the requested batch (timed
interleaved, so a busy machine slows every candidate alike), and agreement with ONNX Runtime FP32 (the
reference the bundle was validated with) as centred cosine and few-shot decision agreement
(`fsdeploy.agreement`). The fastest candidate that passes the gate is recorded in the bundle manifest
(`extra["tuned"]`), and `adapt` / `predict` use it unless --backend or --precision is given. The record
names the CPU and the graph files it was measured on: on another CPU it is not used (and the commands say
so); after the graphs change it is refused until `fsdeploy tune` runs again.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy import __version__
from fsdeploy.agreement import Agreement, agreement, draw_episodes, episode_decisions, indexed_episodes
from fsdeploy.engines import EngineOptions
from fsdeploy.errors import BundleError, FsdeployError, InvalidInput
from fsdeploy.bundle import Bundle, write_manifest

TUNED_KEY = "tuned"  # manifest.extra key
REFERENCE = ("ort", "fp32")
SUPPORT_BATCH = 32  # images per engine call when computing features of the calibration set

Say = Callable[[str], None]


@dataclass(frozen=True)
class Gate:
    """What a candidate must reach to be chosen. The reference (ORT FP32) always qualifies.

    min_agreement: share of few-shot query decisions equal to FP32's (the issue's default 99%).
    min_centred_cosine: mean over images of the centred cosine; 0.9 keeps out graphs whose image-specific
        part of the feature is mostly error (the 7-bit INT8 efficientnet_b0 measured min 0.25, full range 0.93).
    """

    min_agreement: float = 0.99
    min_centred_cosine: float = 0.9

    def passes(self, a: Agreement) -> bool:
        return a.decision_agreement >= self.min_agreement and a.centred_cosine_mean >= self.min_centred_cosine


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str
    hint: str | None = None  # OpenVINO's PERFORMANCE_HINT

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}" + (f" ({self.hint})" if self.hint else "")

    def options(self, threads: int | None) -> EngineOptions:
        return EngineOptions(threads=threads, precision=self.precision, hint=self.hint)


@dataclass(frozen=True)
class TuneRow:
    """One candidate's outcome; `reason` says why a candidate could not run (status 'n/a')."""

    backend: str
    precision: str
    hint: str | None
    status: str  # ok | n/a
    reason: str = ""
    median_ms: float = float("nan")  # query call at `batch` images
    p90_ms: float = float("nan")
    agreement: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    chosen: bool = False


@dataclass(frozen=True)
class TuneRecord:
    """What `fsdeploy tune` measured and chose; stored as `manifest.extra["tuned"]`."""

    backend: str
    precision: str
    hint: str | None
    threads: int | None
    batch: int
    gate: dict[str, float]
    rows: list[dict[str, Any]]
    machine: str  # hash of the CPU signature it was measured on
    files: dict[str, str]  # bundle file -> sha256 at tuning time
    calibration: dict[str, Any]
    fsdeploy: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def machine_key() -> str:
    from fsdeploy.engines.cache_files import cpu_signature

    return hashlib.sha256(cpu_signature().encode()).hexdigest()[:16]


def available_candidates(bundle: Bundle, batch: int) -> list[tuple[Candidate, str]]:
    """Every engine x precision for this bundle, each with '' or the reason it cannot run here."""
    from fsdeploy.deps import available

    has_int8 = bool(bundle.manifest.find_variants(kind="onnx", precision="int8"))
    no_int8 = "" if has_int8 else "no int8 graph: run `fsdeploy quantize BUNDLE --calib DIR`"
    out: list[tuple[Candidate, str]] = [(Candidate("ort", "fp32"), ""), (Candidate("ort", "int8"), no_int8)]
    if available("openvino"):
        from fsdeploy.engines.openvino import bf16_capable, hint_for_batch

        hint = hint_for_batch(batch)
        no_bf16 = "" if bf16_capable() else "this CPU has no bf16 (AVX512-BF16 or AMX)"
        out += [
            (Candidate("openvino", "fp32", hint), ""),
            (Candidate("openvino", "bf16", hint), no_bf16),
            (Candidate("openvino", "bf16-mixed", hint), no_bf16),  # high-resolution layers f32, the rest bf16
            (Candidate("openvino", "int8", hint), no_int8),
        ]
    else:
        out += [(Candidate("openvino", p), "openvino is not installed: pip install fsdeploy[openvino]")
                for p in ("fp32", "bf16", "bf16-mixed", "int8")]
    out.append((Candidate("torch", "fp32"), ""))
    return out


@dataclass
class _Measured:
    feats: np.ndarray
    decisions: np.ndarray
    query: Callable[[], Any]
    close: Callable[[], None]


def _measure(bundle: Bundle, cand: Candidate, images: np.ndarray, episodes: list[Any], batch_images: np.ndarray, threads: int | None) -> _Measured:
    """Features of every calibration image, episode decisions, and a query call at the tuning batch."""
    from fsdeploy.runtime import feature_path

    path = feature_path(bundle, cand.backend, cand.options(threads), keep_warm=True)  # one support pass per episode
    try:
        feats, state = path.support([images[i : i + SUPPORT_BATCH] for i in range(0, len(images), SUPPORT_BATCH)])
        if state:  # task state (CaSE γ) depends on the support set: each episode adapts on its own support
            def per_episode(ep: Any) -> tuple[np.ndarray, np.ndarray]:
                sup, st = path.support([images[ep.support]])
                return sup, path.query(images[ep.query], st)

            decisions = episode_decisions(episodes, per_episode)
        else:
            decisions = episode_decisions(episodes, indexed_episodes(feats))
        path.query(batch_images, state)  # opens the query graph now, so its compile time is not timed
    except BaseException:
        path.close()
        raise
    return _Measured(feats, decisions, lambda: path.query(batch_images, state), path.close)


Timer = Callable[[dict[str, Callable[[], Any]], int], dict[str, tuple[float, float]]]


def interleaved_timer(iters: int = 20, rounds: int = 4) -> Timer:
    """Median and p90 ms per named call, timed round-robin (`fsdeploy.bench.measure.interleaved`)."""

    def timer(fns: dict[str, Callable[[], Any]], batch: int) -> dict[str, tuple[float, float]]:
        from fsdeploy.bench.measure import interleaved

        stats = interleaved(fns, warmup=2, iters=iters, rounds=rounds, batch=batch)
        return {k: (s.median, s.p90) for k, s in stats.items()}

    return timer


def tune_bundle(
    bundle: Bundle,
    calib_dir: str | Path,
    *,
    batch: int = 1,
    gate: Gate | None = None,
    threads: int | None = None,
    ways: int = 5,
    shots: int = 5,
    queries: int = 5,
    episodes: int = 50,
    max_images: int = 200,
    candidates: Sequence[Candidate] | None = None,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    timer: Timer | None = None,
    record: bool = True,
    say: Say | None = None,
) -> TuneRecord:
    """Measure every candidate on `calib_dir` and (with `record`) store the fastest passing one.

    Args:
        bundle: a loaded bundle.
        calib_dir: an ImageFolder (one sub-folder per class) of images like those the model will serve.
        batch: images per query call the latency is measured at (and the OpenVINO hint chosen for).
        gate: agreement the choice must reach; default `Gate()`.
        threads: engine threads (None: each engine's default).
        ways, shots, queries, episodes: the few-shot episodes decision agreement is measured on.
        max_images: at most this many images (a fixed-seed draw) are used.
        candidates: restrict to these (default: every one available here).
        classes: use only these class sub-folders of `calib_dir` (default: all).
        seed: seed of the episode draw.
        timer: latency measurement (default `interleaved_timer()`); injectable for tests.
        record: write the record into the bundle manifest (atomically).

    Raises:
        InvalidInput: bad folder, batch or gate.
        EngineError / BundleError: the reference itself cannot run.
    """
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked

    say = say or (lambda _m: None)
    gate = gate or Gate()
    if batch < 1:
        raise InvalidInput(f"--batch must be >= 1, got {batch}")
    if not 0 <= gate.min_agreement <= 1:
        raise InvalidInput(f"--min-agreement is a share between 0 and 1 (e.g. 0.99), got {gate.min_agreement}")
    files = scan_image_folder(calib_dir, classes=None if classes is None else list(classes))
    if len(files) > max_images:
        files = files.subset(np.sort(np.random.default_rng(0).choice(len(files), max_images, replace=False)))
    say(f"loading {len(files)} images of {len(files.classes)} classes")
    images = load_checked(files.paths, bundle.manifest.preprocess)
    eps = draw_episodes(files.labels, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed)
    batch_images = images[np.arange(batch) % len(images)]
    listed = available_candidates(bundle, batch)
    if candidates is not None:
        wanted = {(c.backend, c.precision) for c in candidates}
        listed = [(c, r) for c, r in listed if (c.backend, c.precision) in wanted or (c.backend, c.precision) == REFERENCE]
    measured: dict[Candidate, _Measured] = {}
    reasons: dict[Candidate, str] = {}
    try:
        for cand, reason in listed:
            if reason:
                reasons[cand] = reason
                continue
            say(f"measuring {cand.label}")
            try:
                measured[cand] = _measure(bundle, cand, images, eps, batch_images, threads)
            except Exception as exc:  # any engine failure makes that row n/a, with its message
                if (cand.backend, cand.precision) == REFERENCE:
                    raise
                reasons[cand] = str(exc).splitlines()[0] if isinstance(exc, FsdeployError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        say(f"timing {len(measured)} engines at batch {batch}")
        times = (timer or interleaved_timer())({c.label: m.query for c, m in measured.items()}, batch)
    finally:
        for m in measured.values():
            m.close()
    ref = measured[next(c for c in measured if (c.backend, c.precision) == REFERENCE)]
    mean = ref.feats.astype(np.float64).mean(0)
    rows: list[TuneRow] = []
    for cand, _ in listed:
        if cand in reasons:
            rows.append(TuneRow(cand.backend, cand.precision, cand.hint, "n/a", reasons[cand]))
            continue
        m = measured[cand]
        a = agreement(m.feats, ref.feats, m.decisions, ref.decisions, episodes=len(eps), mean=mean)
        is_ref = (cand.backend, cand.precision) == REFERENCE
        med, p90 = times[cand.label]
        rows.append(TuneRow(cand.backend, cand.precision, cand.hint, "ok", "", med, p90, a.to_dict(), is_ref or gate.passes(a)))
    best = min((r for r in rows if r.passed), key=lambda r: r.median_ms)
    rows = [replace(r, chosen=r is best) for r in rows]
    rec = TuneRecord(
        backend=best.backend, precision=best.precision, hint=best.hint, threads=threads, batch=batch, gate=asdict(gate),
        rows=[asdict(r) for r in rows], machine=machine_key(), files=_files_used(bundle, best.precision),
        calibration={"folder": str(calib_dir), "images": len(files), "classes": len(files.classes), "ways": eps[0].ways,
                     "shots": shots, "queries_per_class": int(len(eps[0].query) // eps[0].ways), "episodes": len(eps),
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    if record:
        write_manifest(bundle.path, replace(bundle.manifest, extra={**bundle.manifest.extra, TUNED_KEY: rec.to_dict()}))
    return rec


def _files_used(bundle: Bundle, precision: str) -> dict[str, str]:
    """The graph files (and the int8 file for int8) the choice was measured on, with their hashes."""
    m = bundle.manifest
    rels = [g.file for g in m.graphs.values()]
    if precision == "int8":
        rels += [v.file for v in m.find_variants(kind="onnx", precision="int8")]
    return {rel: m.files[rel] for rel in rels if rel in m.files}


@dataclass(frozen=True)
class Choice:
    """The backend and options a command runs with, and a line saying where they came from ('' if given)."""

    backend: str
    options: EngineOptions
    note: str = ""


def resolve_choice(bundle: Bundle, backend: str | None, precision: str | None, *, threads: int | None = None) -> Choice:
    """--backend / --precision when given; else the bundle's tuned choice on the machine it was tuned on;
    else ONNX Runtime FP32.

    Raises:
        BundleError: the tuned choice was measured on graph files that have changed since.
    """
    info = bundle.manifest.extra.get(TUNED_KEY)
    if backend is not None or precision is not None or not info:
        return Choice(backend or "ort", EngineOptions(threads=threads, precision=precision or "fp32"))
    rec = TuneRecord.from_dict(info)
    if rec.machine != machine_key():
        return Choice("ort", EngineOptions(threads=threads), f"note: {bundle.path} was tuned on another CPU; running ort fp32 "
                      f"(run `fsdeploy tune {bundle.path} --calib DIR` here, or pass --backend)")
    changed = [rel for rel, sha in rec.files.items() if bundle.manifest.files.get(rel) != sha]
    if changed:
        raise BundleError(f"the tuned choice in {bundle.path} was measured on older {', '.join(changed)}; "
                          f"re-run `fsdeploy tune {bundle.path} --calib DIR` or pass --backend / --precision")
    opts = EngineOptions(threads=threads if threads is not None else rec.threads, precision=rec.precision, hint=rec.hint)
    return Choice(rec.backend, opts, f"using the tuned choice: {rec.backend} {rec.precision} (`fsdeploy info` shows the evidence)")
