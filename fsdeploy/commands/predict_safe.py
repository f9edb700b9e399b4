"""`predict` over many files where some may be unreadable: classify the rest and report each bad one."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fsdeploy.engines import EngineOptions
from fsdeploy.errors import InvalidInput
from fsdeploy.bundle import Bundle
from fsdeploy.runtime import Prediction, TaskArtefact, predict_images


def predict_or_report(
    bundle: Bundle,
    task: TaskArtefact,
    images: Sequence[str | Path],
    *,
    topk: int,
    backend: str,
    options: EngineOptions,
    batch: int,
    skip_bad: bool,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predictions for the readable images and (path, reason) for each unreadable one.

    Args:
        skip_bad: False refuses the whole run when any image is unreadable (one error naming them).

    Raises:
        InvalidInput: `topk` exceeds the task's classes; an unreadable image without `skip_bad`.
    """
    if topk > len(task.classes):
        raise InvalidInput(f"--topk {topk} but the task has {len(task.classes)} classes; pass --topk {len(task.classes)} or less")
    bad: list[tuple[str, str]] | None = [] if skip_bad else None
    preds = predict_images(bundle, task, images, topk=topk, backend=backend, options=options, batch=batch, bad=bad)
    return preds, bad or []
