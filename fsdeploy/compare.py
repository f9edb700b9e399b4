"""One comparison model: do two runs of a graph agree? Used by export validation (ONNX Runtime vs PyTorch),
TensorRT compare (TensorRT vs ONNX Runtime), quantize (INT8 vs FP32) and the fine-tune fold check.

`compare(graph, inputs, got, want, tolerance)` returns one `OutputCheck` per reference output; a
`CompareReport` holds them with a `Tolerance` per graph and says whether all pass. An output agrees when
max |got - want| <= atol + rtol * max |want| and, where a cosine floor is set, its cosine reaches it. The
relative part matters for intermediate tensors whose scale is far from 1 (CaSE stage states of weights
trained at 32 px run at 224 px: float32 rounding near 1e6 is already ~0.1 absolute).

Why not Polygraphy's `CompareFunc.simple`: its tolerance is elementwise (|a - b| <= atol + rtol * |b|),
which fails every near-zero element of a feature map under a relative bound; fsdeploy's bound is against
each output's scale. Polygraphy stays the TensorRT build and run path (`fsdeploy.engines.trt`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Tolerance:
    """Agreement bound of one graph's outputs."""

    atol: float = 1e-4
    rtol: float = 0.0
    min_cosine: float | None = None

    def bound(self, ref_max_abs: float) -> float:
        return self.atol + self.rtol * ref_max_abs

    def text(self, ref: str = "max|ref|") -> str:
        out = f"max |diff| <= {self.atol:g} + {self.rtol:g}·{ref}"
        return out + (f", cosine >= {self.min_cosine:g}" if self.min_cosine is not None else "")


@dataclass(frozen=True)
class OutputCheck:
    """One output of one graph on one input set."""

    graph: str
    inputs: str  # which input set: "random", "real", "held-out", ...
    name: str
    shape_ok: bool
    max_abs: float
    cosine: float
    ref_max_abs: float = 0.0  # max |reference output|: the scale `rtol` applies to
    # min over rows of cos(x - μ, ref - μ), μ the reference's mean row: for feature outputs (N, D), N > 1, what
    # raw cosine hides (a shared offset dominates it); NaN where not measured (`fsdeploy.agreement`)
    centred_cosine: float = float("nan")

    def ok(self, tol: Tolerance) -> bool:
        return (self.shape_ok and self.max_abs <= tol.bound(self.ref_max_abs)
                and (tol.min_cosine is None or self.cosine >= tol.min_cosine))


@dataclass(frozen=True)
class CompareReport:
    """All checks of one comparison, each judged by its graph's tolerance (`default` for graphs not listed)."""

    checks: tuple[OutputCheck, ...]
    default: Tolerance = field(default_factory=Tolerance)
    per_graph: dict[str, Tolerance] = field(default_factory=dict)
    what: str = ""  # "ONNX Runtime vs PyTorch", "TensorRT fp16 vs ONNX Runtime", ...

    def tolerance(self, graph: str) -> Tolerance:
        return self.per_graph.get(graph, self.default)

    def ok(self, check: OutputCheck) -> bool:
        return check.ok(self.tolerance(check.graph))

    @property
    def passed(self) -> bool:
        return all(self.ok(c) for c in self.checks)

    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not self.ok(c)]

    def worst(self) -> OutputCheck:
        """The failing check furthest beyond its bound (or the closest to it when all pass)."""
        return max(self.checks, key=lambda c: (not self.ok(c), c.max_abs - self.tolerance(c.graph).bound(c.ref_max_abs)))

    def describe_worst(self, ref: str = "PyTorch") -> str:
        w = self.worst()
        tol = self.tolerance(w.graph)
        return (f"{w.graph}.{w.name} differs from {ref} by {w.max_abs:.3g} on {w.inputs} inputs (cosine {w.cosine:.5f}; "
                f"tolerance {tol.atol:g} + {tol.rtol:g} x max|output| {w.ref_max_abs:.3g}"
                + (f", cosine >= {tol.min_cosine:g}" if tol.min_cosine is not None else "") + ")")

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "atol": self.default.atol, "rtol": self.default.rtol, "min_cosine": self.default.min_cosine,
                "per_graph": {g: asdict(t) for g, t in self.per_graph.items()}, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompareReport:
        """Also reads reports written before per-graph tolerances (one atol, maybe no rtol)."""
        checks = tuple(OutputCheck(**c) for c in d["checks"])
        default = Tolerance(float(d["atol"]), float(d.get("rtol", 0.0)), d.get("min_cosine"))
        per_graph = {g: Tolerance(**t) for g, t in (d.get("per_graph") or {}).items()}
        return cls(checks, default, per_graph, str(d.get("what", "")))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays flattened (1.0 for two all-zero arrays)."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    return float(a64 @ b64 / max(na * nb, 1e-300))


def row_cosines(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    """Cosine of each row pair of two `(N, D)` arrays (`cosine` per row)."""
    return np.array([cosine(x, y) for x, y in zip(a, b)], dtype=np.float64)


def compare(graph: str, inputs: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> list[OutputCheck]:
    """Check each reference output `want[name]` against `got[name]` (a missing or misshapen one fails)."""
    checks = []
    for name, ref in want.items():
        out = got.get(name)
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        if out is None or out.shape != ref.shape:
            checks.append(OutputCheck(graph, inputs, name, False, float("inf"), float("nan"), scale))
            continue
        diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
        checks.append(OutputCheck(graph, inputs, name, True, diff, cosine(out, ref), scale))
    return checks
