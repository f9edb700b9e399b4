"""The task artefact: what a device keeps per task (.npz, no pickles), tied to its bundle by the bundle id."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.atomic import save_npz
from fsdeploy.bundle import Bundle
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.heads.base import NonFiniteFeatures

TASK_SCHEMA = 1


@dataclass(frozen=True)
class TaskArtefact:
    """What a device keeps per task: class names, the fitted head (+ transform), and task state (γ)."""

    bundle_id: str
    model: str
    adapter: str
    classes: tuple[str, ...]
    model_state: dict[str, np.ndarray]
    task_state: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write atomically as .npz (no pickles: strings and JSON only)."""
        arrays: dict[str, object] = {
            "schema": TASK_SCHEMA,
            "bundle_id": self.bundle_id,
            "model": self.model,
            "adapter": self.adapter,
            "classes": np.asarray(self.classes, dtype=str),
            "info": json.dumps(self.info, sort_keys=True),
        }
        arrays.update({f"head/{k}": v for k, v in self.model_state.items()})
        arrays.update({f"task/{k}": v for k, v in self.task_state.items()})
        return save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> TaskArtefact:
        """Read a task artefact; a file that is not one gives a clear error."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise InvalidInput(f"task artefact {path} does not exist; create it with `fsdeploy adapt`") from None
        except Exception as exc:
            raise BundleError(f"{path} is not a readable task artefact ({type(exc).__name__}); re-run `fsdeploy adapt`") from None
        try:
            schema = int(d["schema"])
        except (KeyError, TypeError, ValueError):
            schema = None
        if schema != TASK_SCHEMA:
            raise BundleError(f"{path} is not an fsdeploy task artefact of schema {TASK_SCHEMA}; re-run `fsdeploy adapt`")
        missing = [k for k in ("bundle_id", "model", "adapter", "classes", "info") if k not in d]
        if missing:
            raise BundleError(f"{path} is an incomplete task artefact (no {', '.join(missing)}); re-run `fsdeploy adapt`")
        try:
            info = json.loads(str(d["info"]))
        except ValueError:
            raise BundleError(f"{path} has an unreadable info record; re-run `fsdeploy adapt`") from None
        return cls(
            bundle_id=str(d["bundle_id"]),
            model=str(d["model"]),
            adapter=str(d["adapter"]),
            classes=tuple(str(c) for c in d["classes"]),
            model_state={k[5:]: v for k, v in d.items() if k.startswith("head/")},
            task_state={k[5:]: v for k, v in d.items() if k.startswith("task/")},
            info=info,
        )

    def check_bundle(self, bundle: Bundle, path: str | Path = "task") -> None:
        """Refuse a task fitted on a different bundle."""
        if self.bundle_id != bundle.manifest.bundle_id:
            raise BundleError(
                f"task {path} was fitted on a {self.model} ({self.adapter}) bundle with id {self.bundle_id[:12]}, "
                f"but {bundle.path} holds {bundle.manifest.model} ({bundle.manifest.adapter}) id "
                f"{bundle.manifest.bundle_id[:12]}; re-run `fsdeploy adapt` with this bundle"
            )




@contextmanager
def name_bad_images(paths: Sequence[str | Path], what: str) -> Iterator[None]:
    """Turn a head's NonFiniteFeatures (row indices) into one line naming the image files of those rows."""
    try:
        yield
    except NonFiniteFeatures as exc:
        if not paths:
            raise
        names = [str(paths[r]) for r in exc.rows[:5] if r < len(paths)]
        more = f" (+{len(exc.rows) - 5} more)" if len(exc.rows) > 5 else ""
        raise NonFiniteFeatures(
            f"{what} images {', '.join(names)}{more} gave NaN or inf features; check those files, or re-export "
            "the bundle / try --precision fp32 if every image does", exc.rows,
        ) from None
