"""The one place where `fsdeploy.serving` reaches into the rest of fsdeploy.

Every bundle, task, head, engine, CaSE and preprocessing call the serving package makes goes through the
names imported here, so a refactor of those modules only has to re-point these imports.
"""
from __future__ import annotations

from fsdeploy import __version__  # noqa: F401
from fsdeploy.atomic import atomic_dir, atomic_path, write_text  # noqa: F401
from fsdeploy.backbones import Preprocess  # noqa: F401
from fsdeploy.data.images import preprocess_image, to_rgb  # noqa: F401
from fsdeploy.engines import EngineOptions  # noqa: F401
from fsdeploy.engines import Engine, open_engine  # noqa: F401
from fsdeploy.bundle import Bundle, load_bundle  # noqa: F401
from fsdeploy.heads.pipeline import TaskModel  # noqa: F401
from fsdeploy.runtime import feature_path  # noqa: F401
from fsdeploy.runtime import TaskArtefact  # noqa: F401

QUERY_GRAPH = "query"  # the CaSE query graph: images (B,3,H,W), gamma (G,) -> features (B,D)
FEATURES_GRAPH = "features"  # the plain graph: images (B,3,H,W) -> features (B,D)
CASE_ADAPTER = "case"
TASK_GRAPH_KEY = "graph"  # task_state entry holding a folded (TSA / BN-affine) ONNX graph
GAMMA_KEY = "gamma"  # task_state entry holding CaSE's γ (G,)
