"""How closely a lower-precision engine follows the FP32 reference, in the terms a few-shot user cares about.

Two measures, reported together by every precision report (`quantize`, `tune`, TensorRT fp16):

- **Centred cosine**: per image, cos(f - μ, f_ref - μ) with μ the mean FP32 feature of the calibration
  set. Raw cosine is dominated by the shared mean direction of post-ReLU features (every coordinate ≥ 0),
  so a graph whose image-specific part is noise can still score 0.999 raw; centring removes the shared
  part, and nearest-prototype decisions depend only on what is left.
- **Decision agreement**: on few-shot episodes drawn from the calibration folders (fixed seed), the share
  of query decisions of a nearest-centroid head (Prototypical Networks, Snell et al. 2017) fitted on the
  engine's support features that equal the decisions of the same head on FP32 features.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fsdeploy.data.episodes import Episode, sample_episode
from fsdeploy.errors import InvalidInput

F32 = NDArray[np.float32]
# (support features, query features) of one episode for one engine
EpisodeFeatures = Callable[[Episode], tuple[F32, F32]]


@dataclass(frozen=True)
class Agreement:
    """Agreement of one engine's features with the FP32 reference's."""

    centred_cosine_min: float  # over images, features centred on the reference's calibration mean
    centred_cosine_mean: float
    raw_cosine_min: float  # shown for contrast only: it hides errors the centred one shows
    decision_agreement: float  # share of episode query decisions equal to the reference's (0..1)
    decisions: int  # query decisions compared
    episodes: int
    max_abs: float  # max |feature - reference feature|
    ref_max_abs: float  # max |reference feature|, the scale max_abs is read against

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_cosines(a: NDArray[Any], b: NDArray[Any]) -> NDArray[np.float64]:
    """Per-row cosine of `(N, D)` arrays (1.0 where both rows are zero)."""
    a64, b64 = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    cos = (a64 * b64).sum(1) / np.maximum(na * nb, 1e-300)
    return np.where((na == 0) & (nb == 0), 1.0, cos)


def centred_cosines(got: F32, ref: F32, mean: NDArray[Any] | None = None) -> NDArray[np.float64]:
    """Per-image cosine of `got - mean` and `ref - mean`; `mean` defaults to the mean of `ref`."""
    mu = ref.astype(np.float64).mean(0) if mean is None else np.asarray(mean, dtype=np.float64)
    return row_cosines(got.astype(np.float64) - mu, ref.astype(np.float64) - mu)


def draw_episodes(labels: NDArray[np.int64], *, ways: int, shots: int, queries: int, episodes: int, seed: int = 0) -> list[Episode]:
    """`episodes` fixed-seed episodes from `labels`; `ways` and `queries` shrink to what the folders hold.

    Raises:
        InvalidInput: fewer than two classes with `shots + 1` images each.
    """
    counts = np.bincount(np.asarray(labels))
    big = counts[counts >= shots + 1]
    if big.size < 2:
        raise InvalidInput(
            f"episodes need 2 classes with >= {shots + 1} images each ({shots}-shot plus a query); the calibration "
            f"folders have {int((counts > 0).sum())} classes with {int(counts.max()) if counts.size else 0} images at most — add images or lower --shots"
        )
    ways = min(ways, int(big.size))
    queries = max(1, min(queries, int(np.sort(big)[-ways]) - shots))
    rng = np.random.default_rng(seed)
    return [sample_episode(labels, ways, shots, queries, rng) for _ in range(episodes)]


def ncc_decisions(support: F32, support_labels: NDArray[np.int64], query: F32) -> NDArray[np.int64]:
    """Nearest class mean (squared Euclidean) decisions for `query`."""
    from fsdeploy.heads import make_head

    head = make_head("ncc").fit(support.astype(np.float32), support_labels)
    return np.argmax(head.predict_proba(query.astype(np.float32)), axis=1)


def indexed_episodes(feats: F32) -> EpisodeFeatures:
    """Episode features taken from features of every image (engines with no task state)."""
    return lambda ep: (feats[ep.support], feats[ep.query])


def episode_decisions(episodes: Sequence[Episode], features: EpisodeFeatures) -> NDArray[np.int64]:
    """Every episode's query decisions, concatenated."""
    out = [_decide(ep, features) for ep in episodes]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _decide(ep: Episode, features: EpisodeFeatures) -> NDArray[np.int64]:
    support, query = features(ep)
    return ncc_decisions(support, ep.support_labels, query)


def agreement(
    got: F32, ref: F32, got_decisions: NDArray[np.int64], ref_decisions: NDArray[np.int64], *, episodes: int, mean: NDArray[Any] | None = None
) -> Agreement:
    """Both measures from features of the calibration images and decisions on the same episodes.

    Raises:
        InvalidInput: the arrays do not pair up.
    """
    if got.shape != ref.shape or got_decisions.shape != ref_decisions.shape:
        raise InvalidInput(f"cannot compare features {got.shape} with {ref.shape} or decisions {got_decisions.shape} with {ref_decisions.shape}")
    cc = centred_cosines(got, ref, mean)
    return Agreement(
        centred_cosine_min=float(cc.min()),
        centred_cosine_mean=float(cc.mean()),
        raw_cosine_min=float(row_cosines(got, ref).min()),
        decision_agreement=float((got_decisions == ref_decisions).mean()) if ref_decisions.size else 1.0,
        decisions=int(ref_decisions.size),
        episodes=int(episodes),
        max_abs=float(np.abs(got.astype(np.float64) - ref).max()),
        ref_max_abs=float(np.abs(ref).max()),
    )


def agreement_of_features(
    got: F32, ref: F32, labels: NDArray[np.int64], *, ways: int = 5, shots: int = 5, queries: int = 5, episodes: int = 100, seed: int = 0,
    mean: NDArray[Any] | None = None,
) -> Agreement:
    """Agreement for engines without task state: episodes index the features of every image."""
    eps = draw_episodes(labels, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed)
    return agreement(got, ref, episode_decisions(eps, indexed_episodes(got)), episode_decisions(eps, indexed_episodes(ref)),
                     episodes=len(eps), mean=mean)
