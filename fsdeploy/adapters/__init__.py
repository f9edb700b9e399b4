"""Adapter kinds, one file each: none, case (UpperCaSE), toast (TOAST), tsa (TSA α+β), bn_affine, full_ft, partial_ft, maml.

`ADAPTERS` is the registry generic code reads; see `fsdeploy.adapters.base.AdapterKind` for what a kind
carries and the README's "Extending fsdeploy" for adding one.
"""
from __future__ import annotations

from fsdeploy.adapters.base import (
    ADAPTERS,
    AdapterKind,
    adapter_kind,
    build_adapted,
    exported_kinds,
    finetuner_methods,
    finetuners,
    register_adapter,
    steps_help,
)

__all__ = ["ADAPTERS", "AdapterKind", "adapter_kind", "build_adapted", "exported_kinds", "finetuner_methods", "finetuners", "register_adapter", "steps_help"]
