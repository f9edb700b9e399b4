"""Few-shot accuracy of a per-task fine-tuner (TSA, BN-affine) on the episodes `bench.accuracy` draws.

A thin form of `fsdeploy.bench.accuracy.evaluate` with one fine-tuner method: each episode is fitted in
PyTorch, folded, re-exported and its queries run through the folded graph on the engine (the deployed
path), in the same episode loop as the head methods, so rows from both line up episode by episode.
"""
from __future__ import annotations

from collections.abc import Callable

from fsdeploy.adapters import finetuner_methods
from fsdeploy.bench.accuracy import AccuracyRow, Method, evaluate
from fsdeploy.bundle import Bundle
from fsdeploy.data.folders import LabelledFiles
from fsdeploy.errors import UnknownName


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
    steps: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> AccuracyRow:
    """Mean accuracy ± 95% CI of fine-tuner `method`: a cost-table key of a per-task fine-tuner (tsa, tsa-seen,
    bn-affine, bn-affine-olor; `fsdeploy.adapters.finetuner_methods`).

    Args:
        label: the row's `bundle` text; name: its `method` text (default the key, e.g. a cost-table label).

    Raises:
        UnknownName: not an adapter kind; InvalidInput: not a per-task fine-tuner or not this bundle's family.
    """
    methods = finetuner_methods()
    if method not in methods:
        raise UnknownName(f"no per-task fine-tuner {method!r}; choose from {', '.join(methods)}")
    kind, opts = methods[method]
    (row,) = evaluate(bundle, data, [Method(name or method, adapter=kind, steps=steps, opts=opts)], ways=ways, shots=shots,
                      queries=queries, episodes=episodes, seed=seed, label=label, progress=progress)
    return row
