"""Counted products: every multiply-accumulate a head or transform performs goes through this module.

MAC convention behind every `fit_macs`, `predict_macs` and transform `macs`:

- `mm(a, b)` with a (m, k) and b (k, n) costs m*k*n MACs, whatever BLAS does inside (no credit for
  symmetric or triangular structure, one-hot operands or zeros).
- `rowdot(a, b)` with a, b (n, d) costs n*d MACs (row-wise dots: squared norms, cosine numerators).
- Everything else costs 0: elementwise arithmetic (scaling, exp, log, sqrt, division, the optimisers'
  updates), reductions without a product (sum, max, mean) and gathers.

Heads call these through the module (`ops.mm(...)`), never `@`, `np.dot` or `np.einsum`, so a test can
swap in counting versions (monkeypatch `fsdeploy.heads.ops.mm` / `rowdot`) and check each closed-form count
against a counted run.
"""
from __future__ import annotations

import numpy as np


def mm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Matrix product a (m, k) @ b (k, n); m*k*n MACs."""
    return np.matmul(a, b, out=out)


def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (n, d) arrays -> (n,); n*d MACs."""
    return np.einsum("ij,ij->i", a, b)


def mm_macs(m: int, k: int, n: int) -> int:
    """MACs of `mm` on (m, k) @ (k, n)."""
    return int(m) * int(k) * int(n)


def rowdot_macs(n: int, d: int) -> int:
    """MACs of `rowdot` on two (n, d) arrays."""
    return int(n) * int(d)
