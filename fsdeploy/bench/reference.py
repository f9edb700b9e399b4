"""Plain-PyTorch versions of the deployed recipes: the other side of every issue #8 ratio.

Each function does what a PyTorch user would write for the same recipe (timm's eval transform on PIL
images, the module in eager mode under `inference_mode`, `torch.optim.Adam` for the head, `torch.save`),
fed the same random draws as the deployed path, so the two sides differ only in how they compute.

UpperCaSE recipe (Patacchiola et al., NeurIPS 2022): context pass over the support set gives γ and the
support features; a zero-initialised linear layer is trained with Adam (weight decay 1e-5) for 500 steps on
batches of 128 rows drawn with replacement, learning rate falling linearly from 1e-3 to 1e-5.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from fsdeploy.backbones import Preprocess
from fsdeploy.runtime import AdaptTimings

ImageTransform = Callable[[Image.Image], torch.Tensor]


def timm_transform(preprocess: Preprocess) -> ImageTransform:
    """timm's own eval transform (torchvision ops on PIL images) for the bundle's preprocessing values."""
    import timm.data

    return timm.data.create_transform(
        input_size=preprocess.input_size, is_training=False, interpolation=preprocess.interpolation,
        mean=preprocess.mean, std=preprocess.std, crop_pct=preprocess.crop_pct,
    )


def load_images_torch(paths: Sequence[str | Path], transform: ImageTransform) -> torch.Tensor:
    """Decode files with PIL and apply `transform`: `(N, 3, H, W)` float32."""
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(transform(img.convert("RGB")))
    return torch.stack(out)


def torch_linear_head(
    feats: NDArray[np.float32] | torch.Tensor,
    labels: NDArray[np.int64] | torch.Tensor,
    n_classes: int,
    batches: NDArray[np.int64],
    lrs: NDArray[np.float64],
    *,
    weight_decay: float = 1e-5,
    after_step: Callable[[torch.nn.Linear], None] | None = None,
) -> torch.nn.Linear:
    """The UpperCaSE head as a PyTorch loop: zero-init nn.Linear, Adam, mean cross-entropy per drawn batch.

    The one torch reference of this head: tests and benchmarks import it.

    Args:
        batches: (T, B) row indices per step (`fsdeploy.heads.linear.draw_batches`, same generator as the head).
        lrs: (T,) learning rate per step.
        after_step: called with the layer after each optimiser step (e.g. a rollback towards the init).
    """
    x = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=float(lrs[0]), betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for t, rows in enumerate(batches):
        opt.param_groups[0]["lr"] = float(lrs[t])
        opt.zero_grad()
        idx = torch.from_numpy(rows)
        F.cross_entropy(lin(x[idx]), y[idx]).backward()
        opt.step()
        if after_step is not None:
            after_step(lin)
    return lin


def linear_recipe(n_support: int, seed: int, head_opts: Mapping[str, Any] | None = None) -> tuple[NDArray[np.int64], NDArray[np.float64], float]:
    """(batches, learning rates, weight decay) of fsdeploy's `linear` head fitted with `default_rng(seed)`.

    `fsdeploy.runtime.task.adapt_task` passes `default_rng(seed)` to the head, whose first draw is every batch, so
    these are exactly the batches the deployed head trains on.
    """
    from fsdeploy.heads import make_head
    from fsdeploy.heads.linear import draw_batches

    head = make_head("linear", **dict(head_opts or {}))
    batches = draw_batches(np.random.default_rng(seed), n_support, head.iters, head.batch)  # type: ignore[attr-defined]
    return batches, head.learning_rates(), float(head.weight_decay)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TorchTask(AdaptTimings):
    """A task adapted in PyTorch eager: the part timings (ms) of `AdaptTimings`, γ (None without CaSE), the head."""

    gamma: torch.Tensor | None = None
    head: torch.nn.Linear | None = None


def torch_features(graphs: Mapping[str, Any], images: torch.Tensor, gamma: torch.Tensor | None = None) -> Any:
    """Eager features of `images`: the query graph under `gamma` when given, else the context graph
    (CaSE bundles: returns (features, gamma)) or the plain `features` graph."""
    with torch.inference_mode():
        if gamma is not None:
            return graphs["query"].eager(images, gamma)
        if "context" in graphs:
            return graphs["context"].module(images)  # (features, gamma)
        return graphs["features"].module(images)


def torch_adapt(
    graphs: Mapping[str, Any],
    paths: Sequence[str | Path],
    labels: NDArray[np.int64],
    transform: ImageTransform,
    out: str | Path,
    *,
    seed: int = 0,
    head_threads: int | None = None,
) -> TorchTask:
    """Adapt one task the PyTorch way: load, context (or feature) pass in one batch, Adam head, torch.save.

    Args:
        graphs: `fsdeploy.exporters.rebuild.torch_graphs(bundle)` (CaSE: uses `context`; plain: `features`).
        labels: class index per support path, 0..K-1.
        head_threads: torch threads for the head loop only (small matrices; None keeps the current setting).
    """
    t0 = time.perf_counter()
    images = load_images_torch(paths, transform)
    t1 = time.perf_counter()
    out_feats = torch_features(graphs, images)
    feats, gamma = out_feats if isinstance(out_feats, tuple) else (out_feats, None)
    t2 = time.perf_counter()
    batches, lrs, decay = linear_recipe(len(paths), seed)
    before = torch.get_num_threads()
    torch.set_num_threads(head_threads or before)
    try:
        head = torch_linear_head(feats.clone(), labels, int(labels.max()) + 1, batches, lrs, weight_decay=decay)
    finally:
        torch.set_num_threads(before)
    t3 = time.perf_counter()
    state = {"weight": head.weight.detach(), "bias": head.bias.detach()}
    if gamma is not None:
        state["gamma"] = gamma.clone()
    torch.save(state, str(out))
    t4 = time.perf_counter()
    ms = 1e3
    return TorchTask((t1 - t0) * ms, (t2 - t1) * ms, (t3 - t2) * ms, (t4 - t3) * ms,
                     gamma=None if gamma is None else gamma.clone(), head=head)


def torch_predict(
    graphs: Mapping[str, Any], task: TorchTask, paths: Sequence[str | Path], transform: ImageTransform, batch: int = 32
) -> NDArray[np.int64]:
    """Class index per query file from a PyTorch-adapted task."""
    preds = []
    for i in range(0, len(paths), batch):
        images = load_images_torch(paths[i : i + batch], transform)
        feats = torch_features(graphs, images, task.gamma)
        with torch.inference_mode():
            preds.append(task.head(feats).argmax(1).numpy())
    return np.concatenate(preds).astype(np.int64)
