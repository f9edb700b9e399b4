"""fsdeploy: take few-shot image classifiers from research code to edge GPUs."""
from __future__ import annotations

__version__ = "0.1.0"
