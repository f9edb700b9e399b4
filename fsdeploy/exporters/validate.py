"""Compare an exported graph with its PyTorch module: every output's shape, max-abs diff and cosine.

Validation returns a report; the caller decides whether to raise, and the report is saved in the bundle.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OutputCheck:
    """One output of one graph on one input set."""

    graph: str
    inputs: str  # which input set: "random" or "real"
    name: str
    shape_ok: bool
    max_abs: float
    cosine: float
    ref_max_abs: float = 0.0  # max |PyTorch output|: the scale `rtol` applies to (0 in reports before it)


@dataclass(frozen=True)
class ValidationReport:
    """All checks of a bundle; `passed` when every shape matches and every output is within tolerance.

    Tolerance per output: max |diff| <= atol + rtol * max |PyTorch output|. The relative part matters for
    intermediate tensors (CaSE stage states) whose scale is far from 1, e.g. weights trained at 32 px run at
    224 px: float32 rounding of values near 1e6 is already ~0.1 in absolute terms.
    """

    checks: tuple[OutputCheck, ...]
    atol: float
    rtol: float = 0.0

    def ok(self, check: OutputCheck) -> bool:
        return check.shape_ok and check.max_abs <= self.atol + self.rtol * check.ref_max_abs

    @property
    def passed(self) -> bool:
        return all(self.ok(c) for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {"atol": self.atol, "rtol": self.rtol, "passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> ValidationReport:
        checks = tuple(OutputCheck(**c) for c in d["checks"])  # type: ignore[arg-type, union-attr]
        return cls(checks, float(d["atol"]), float(d.get("rtol", 0.0)))  # type: ignore[arg-type]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays flattened (1.0 for two all-zero arrays)."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    return float(a64 @ b64 / max(na * nb, 1e-300))


def compare_outputs(
    graph: str, inputs: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
) -> list[OutputCheck]:
    """Check each reference output `want[name]` against `got[name]`."""
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
