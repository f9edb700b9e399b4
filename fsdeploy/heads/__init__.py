"""Per-task heads and feature transforms, fitted in numpy on engine features.

Importing the package imports every module in it, so the registries are full:
`HEADS` / `make_head` / `head_from_state` and `TRANSFORMS` / `make_transform`. `TaskModel` chains one
transform and one head. MAC counts follow the convention in `fsdeploy.heads.ops`.
"""
from __future__ import annotations

from fsdeploy.heads.base import HEADS, Head, head_from_state, make_head, register_head
from fsdeploy.heads.pipeline import TaskModel
from fsdeploy.heads.transforms import (
    TRANSFORMS,
    Transform,
    make_transform,
    register_transform,
    transform_from_state,
)
from fsdeploy.registry import import_package_modules

import_package_modules("fsdeploy.heads")  # every head and transform file registers itself: a new one is one file

__all__ = [
    "HEADS", "Head", "head_from_state", "make_head", "register_head",
    "TRANSFORMS", "Transform", "make_transform", "register_transform", "transform_from_state",
    "TaskModel",
]
