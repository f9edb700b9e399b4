"""Seeded few-shot episode sampling: N-way K-shot, and Meta-Dataset-style variable ways and shots.

Episodes are values (indices into a labelled set), so the same seed gives the same episode anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fsdeploy.errors import InvalidInput


@dataclass(frozen=True)
class Episode:
    """Support/query row indices into a dataset, with labels re-indexed 0..ways-1.

    `classes[j]` is the dataset label of episode class j.
    """

    support: NDArray[np.int64]
    support_labels: NDArray[np.int64]
    query: NDArray[np.int64]
    query_labels: NDArray[np.int64]
    classes: NDArray[np.int64]

    @property
    def ways(self) -> int:
        return int(self.classes.shape[0])


def _by_class(labels: NDArray[np.int64], pool: NDArray[np.int64] | None) -> dict[int, NDArray[np.int64]]:
    classes = np.unique(labels) if pool is None else np.asarray(pool, dtype=np.int64)
    return {int(c): np.flatnonzero(labels == c) for c in classes}


def sample_episode(
    labels: NDArray[np.int64],
    ways: int,
    shots: int,
    queries: int,
    rng: np.random.Generator,
    *,
    classes: NDArray[np.int64] | None = None,
) -> Episode:
    """Draw `ways` classes, then `shots` support and `queries` query rows per class, without overlap.

    Args:
        labels: dataset label per row.
        classes: the class pool to draw from (e.g. the novel split); default all labels.

    Raises:
        InvalidInput: fewer classes than `ways` or a class with fewer than shots + queries rows.
    """
    rows = _by_class(np.asarray(labels), classes)
    eligible = np.asarray(sorted(c for c, r in rows.items() if r.size >= shots + queries), dtype=np.int64)
    if eligible.size < ways:
        raise InvalidInput(
            f"{ways}-way {shots}-shot with {queries} queries needs {ways} classes with >= {shots + queries} images; "
            f"only {eligible.size} have that many"
        )
    chosen = rng.choice(eligible, size=ways, replace=False)
    picks = [rng.choice(rows[int(c)], size=shots + queries, replace=False) for c in chosen]
    return _assemble(chosen, [p[:shots] for p in picks], [p[shots:] for p in picks])


def sample_variable_episode(
    labels: NDArray[np.int64],
    rng: np.random.Generator,
    *,
    classes: NDArray[np.int64] | None = None,
    max_ways: int = 50,
    max_support: int = 500,
    max_query_per_class: int = 10,
) -> Episode:
    """Meta-Dataset-style episode: ways uniform in [5, max_ways], a per-class query count, and a support
    budget split across classes in random proportions (Triantafillou et al. 2020, simplified).

    Each class keeps at least one support image; the total support never exceeds `max_support`.
    """
    rows = _by_class(np.asarray(labels), classes)
    pool = np.asarray(sorted(c for c, r in rows.items() if r.size >= 2), dtype=np.int64)
    if pool.size < 5:
        raise InvalidInput(f"variable-way episodes need >= 5 classes with >= 2 images, found {pool.size}")
    ways = int(rng.integers(5, min(max_ways, pool.size) + 1))
    chosen = rng.choice(pool, size=ways, replace=False)
    smallest = min(rows[int(c)].size for c in chosen)
    q = int(min(max_query_per_class, max(1, smallest // 2)))
    beta = rng.uniform(0.0, 1.0)
    budget = min(max_support, sum(min(100, rows[int(c)].size - q) for c in chosen))
    weights = np.exp(beta * rng.uniform(np.log(0.5), np.log(2.0), size=ways))
    weights /= weights.sum()
    sup, qry = [], []
    for j, c in enumerate(chosen):
        r = rng.permutation(rows[int(c)])
        k = int(np.clip(np.floor(weights[j] * (budget - ways)) + 1, 1, r.size - q))
        qry.append(r[:q])
        sup.append(r[q : q + k])
    return _assemble(chosen, sup, qry)


def _assemble(chosen: np.ndarray, sup: list[np.ndarray], qry: list[np.ndarray]) -> Episode:
    """Episode from per-class support/query rows; class j of the episode is dataset class chosen[j]."""
    sup_y = [np.full(len(r), j) for j, r in enumerate(sup)]
    qry_y = [np.full(len(r), j) for j, r in enumerate(qry)]
    return Episode(
        np.concatenate(sup).astype(np.int64),
        np.concatenate(sup_y).astype(np.int64),
        np.concatenate(qry).astype(np.int64),
        np.concatenate(qry_y).astype(np.int64),
        np.asarray(chosen, dtype=np.int64),
    )
