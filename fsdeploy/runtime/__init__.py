"""The device side: open bundle graphs on engines, run each adapter kind's feature path, adapt and predict.

- `open`: resolve a bundle graph to a source and open it (`open_graph`), the torch module cache.
- `paths`: feature paths (support half per task, query half per request) per adapter kind.
- `case_pass`: UpperCaSE's exact chunked context pass over support sets of any size.
- `task`: the task artefact (.npz) and its bundle check.
- `adapt`: one adaptation API (`TaskAdapter`, `adapt_task`, `predict_images`) for every kind.
"""
from __future__ import annotations

from fsdeploy.runtime.adapt import AdaptTimings, Prediction, TaskAdapter, adapt_task, predict_images
from fsdeploy.runtime.open import GraphOpener, graph_source, open_graph, torch_graphs
from fsdeploy.runtime.paths import FeaturePath, feature_path
from fsdeploy.runtime.task import TaskArtefact

__all__ = [
    "AdaptTimings", "FeaturePath", "GraphOpener", "Prediction", "TaskAdapter", "TaskArtefact", "adapt_task",
    "feature_path", "graph_source", "open_graph", "predict_images", "torch_graphs",
]
