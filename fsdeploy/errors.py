"""The error hierarchy. Library code raises these; the CLI turns them into one line and exit 1."""
from __future__ import annotations


class FsdeployError(Exception):
    """Base class: the message is shown to the user as-is, so it must say what to do."""


class MissingDependency(FsdeployError):
    """An optional package is not installed; the message names the pip extra."""


class InvalidInput(FsdeployError):
    """A user-supplied file, folder or option is unusable."""


class FitDiverged(InvalidInput):
    """A per-task fit's loss became NaN or inf: that task has no classifier (the message names the fix)."""


class UnknownName(FsdeployError):
    """A registry lookup (model, head, engine, adapter) failed."""


class RegistryError(FsdeployError):
    """A name was registered twice."""


class BundleError(FsdeployError):
    """A bundle or task artefact is missing, corrupt, stale or does not match."""


class ValidationFailed(FsdeployError):
    """An exported graph disagrees with PyTorch beyond tolerance."""


class EngineError(FsdeployError):
    """An engine refused its inputs or failed to build or run."""


class FsdeployWarning(UserWarning):
    """Something was done that the user may not expect (random weights, a non-native size); the CLI shows one line."""
