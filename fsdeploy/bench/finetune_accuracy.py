"""Few-shot accuracy of the per-task fine-tuning methods (TSA, BN-affine) on the episodes `bench.accuracy` uses.

TSA: Li, Liu, Bilen, "Cross-domain Few-shot Learning with Task-specific Adapters", CVPR 2022. BN-affine:
the same loss and optimiser training only the BatchNorm affine parameters (`fsdeploy.train.tsa`).

Per episode the method is fitted on the support images in PyTorch (`fit_tsa` / `fit_bn_affine`), and the
head `fsdeploy adapt --adapter` stores is fitted on the adapted features: TSA's β-aligned cosine NCC
(`lt-ncc`, steps 0, init β), BN-affine's cosine NCC (scale 10). The deployed path runs the folded,
re-exported graph instead of the adapter network; `fsdeploy.finetune_task` refuses a fold that moves
features by more than 1e-4, so accuracy here is the deployed accuracy. Episodes are drawn exactly as
`fsdeploy.bench.accuracy.evaluate` draws them (same generator calls), so rows from both line up.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fsdeploy.bench.accuracy import AccuracyRow, _ImageCache
from fsdeploy.bench.stats import mean_ci95
from fsdeploy.data.episodes import sample_episode
from fsdeploy.data.folders import LabelledFiles
from fsdeploy.errors import UnknownName
from fsdeploy.exporters.bundle import Bundle


def _fit_tsa(backbone: Any, images: np.ndarray, labels: np.ndarray, steps: int, domain: str = "unseen") -> tuple[Any, Any]:
    from fsdeploy.heads.pipeline import TaskModel
    from fsdeploy.train.tsa import TSA_LEARNING_RATES, fit_tsa

    lr_alpha, lr_beta = TSA_LEARNING_RATES[domain]
    res = fit_tsa(backbone, images, labels, steps=steps, lr_alpha=lr_alpha, lr_beta=lr_beta, device="cpu")
    return res.model, TaskModel.create("lt-ncc", "none", steps=0, init=res.beta)


def _fit_bn_affine(
    backbone: Any, images: np.ndarray, labels: np.ndarray, steps: int, optimizer: str = "adadelta"
) -> tuple[Any, Any]:
    from fsdeploy.heads.pipeline import TaskModel
    from fsdeploy.train.tsa import fit_bn_affine

    res = fit_bn_affine(backbone, images, labels, steps=steps, optimizer=optimizer, device="cpu")
    return res.model, TaskModel.create("ncc", "none", distance="cosine", scale=10.0)


# method key (as in fsdeploy.bench.costs) -> fit(backbone, images, labels, steps) -> (adapted model, head)
FITTERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "tsa": _fit_tsa,
    "tsa-seen": lambda *a: _fit_tsa(*a, domain="seen"),
    "bn-affine": _fit_bn_affine,
    "bn-affine-olor": lambda *a: _fit_bn_affine(*a, optimizer="olor"),
}


def finetune_accuracy(
    bundle: Bundle,
    data: LabelledFiles,
    method: str,
    *,
    label: str,
    name: str | None = None,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 100,
    seed: int = 0,
    steps: int = 40,
    progress: Callable[[int], None] | None = None,
) -> AccuracyRow:
    """Mean accuracy ± 95% CI of fine-tuning `method` (a FITTERS key: tsa, tsa-seen, bn-affine, bn-affine-olor).

    Args:
        label: the row's `bundle` text; name: its `method` text (default the key, e.g. a cost-table label).

    Raises:
        UnknownName: another method.
    """
    import torch

    from fsdeploy.exporters.rebuild import torch_graphs

    if method not in FITTERS:
        raise UnknownName(f"no fine-tuning accuracy for {method!r}; choose from {', '.join(FITTERS)}")
    backbone = torch_graphs(bundle)["features"].module
    rng = np.random.default_rng(seed)
    images = _ImageCache(data, bundle)
    acc, fit_ms, feat_ms = [], [], []
    for _ in range(episodes):
        ep = sample_episode(data.labels, ways, shots, queries, rng)
        rng.integers(0, 2**31 - 1)  # evaluate() draws a head seed here; keep the generator in step
        sup, qry = images.get(ep.support), images.get(ep.query)
        start = time.perf_counter()
        model, head = FITTERS[method](backbone, sup, ep.support_labels, steps)
        with torch.no_grad():
            sup_f = model(torch.from_numpy(sup)).numpy()
            fitted = time.perf_counter()
            head.fit(sup_f, ep.support_labels)
            qry_f = model(torch.from_numpy(qry)).numpy()
        fit_ms.append((fitted - start) * 1e3)
        feat_ms.append((time.perf_counter() - fitted) * 1e3)
        acc.append(float(np.mean(head.predict(qry_f) == ep.query_labels)) * 100.0)
        if progress:
            progress(1)
    mean, half = mean_ci95(acc)
    return AccuracyRow(bundle=label, method=name or method, ways=ways, shots=shots, episodes=episodes, accuracy=mean, ci95=half,
                       features_ms=float(np.median(feat_ms)), fit_ms=float(np.median(fit_ms)),
                       query_ms_per_image=float(np.median(feat_ms)) / max(1, len(ep.query)))
