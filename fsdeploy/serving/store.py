"""The repository's task store: `tasks/<task id>.npz`, one fsdeploy task artefact per task, read while serving.

Tasks are added, replaced and removed by replacing or deleting files (atomically: `os.replace`), so no
model reloads. Each Python-backend model process keeps its own cache, keyed by the file's identity (inode,
mtime, size): a replaced or corrupted file is read again on the next request; a deleted one is unknown.
`task_state` turns a task id into a versioned key `id@version`; later steps load exactly that version, so a
request never mixes γ of one version with the head of another.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.serving.links import TaskArtefact, TaskModel

TASKS_DIR = "tasks"
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
KEEP_VERSIONS = 2  # per task: the current version and the one before (requests in flight across a replace)
MAX_CACHED_TASKS = 20_000  # per process; the least recently used task is dropped (and read again when asked)


class UnknownTask(InvalidInput):
    """The task id names no file in the store."""


def check_task_id(task_id: str) -> str:
    """Raises InvalidInput unless `task_id` is 1-128 of [A-Za-z0-9_.-], starting with a letter or digit."""
    if not TASK_ID.match(task_id or ""):
        raise InvalidInput(
            f"task id {task_id!r} is not valid; use 1-128 letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return task_id


@dataclass
class TaskEntry:
    """One loaded version of a task."""

    task_id: str
    version: str
    artefact: TaskArtefact
    _model: TaskModel | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.task_id}@{self.version}"

    @property
    def model(self) -> TaskModel:
        if self._model is None:
            self._model = TaskModel.from_state(self.artefact.model_state)
        return self._model


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class TaskStore:
    """Read-side of `REPO/tasks`.

    Args:
        root: the `tasks` folder.
        bundle_id: tasks fitted on another bundle are refused.
        gamma_size: CaSE γ length the query graph takes (None: not a CaSE bundle).
        folded: tasks with their own folded graph (TSA, BN-affine) are servable (the Python features model).
        max_tasks: most task ids kept loaded (least recently used dropped first).
        keep_graphs: keep a folded task's graph bytes (only the features model runs them; the others drop
            them after loading, 46 MB per resnet18 task).
    """

    def __init__(self, root: str | Path, bundle_id: str, gamma_size: int | None = None, *, folded: bool = True,
                 max_tasks: int = MAX_CACHED_TASKS, keep_graphs: bool = True) -> None:
        self.root = Path(root)
        self.keep_graphs = keep_graphs
        self.folded = folded
        self.bundle_id = bundle_id
        self.gamma_size = gamma_size
        self.max_tasks = max_tasks
        self._entries: OrderedDict[str, list[TaskEntry]] = OrderedDict()  # task id -> newest first; LRU order

    def path(self, task_id: str) -> Path:
        return self.root / f"{check_task_id(task_id)}.npz"

    def known(self) -> list[str]:
        """Task ids present on disk now."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.npz") if not p.name.startswith("."))

    def resolve(self, task_id: str) -> TaskEntry:
        """The task's current version, loaded (or from cache when the file has not changed).

        Raises:
            UnknownTask: no such task file.
            BundleError: the file is not a readable task artefact, or belongs to another bundle.
        """
        path = self.path(task_id)
        for _ in range(3):  # the file may be replaced between stat and read; retry with the new one
            try:
                st = path.stat()
            except FileNotFoundError:
                known = self.known()
                raise UnknownTask(
                    f"unknown task id {task_id!r}; this server has {len(known)} task(s)"
                    f"{': ' + ', '.join(known[:10]) if known else ''}{' ...' if len(known) > 10 else ''}; "
                    "add it with the `adapt` model or `fsdeploy triton add-task`"
                ) from None
            version = _version(st)
            cached = self._find(task_id, version)
            if cached is not None:
                return cached
            entry = self._load(task_id, path, version)
            try:
                if _version(path.stat()) != version:
                    continue
            except FileNotFoundError:
                continue
            versions = self._entries.setdefault(task_id, [])
            versions.insert(0, entry)
            del versions[KEEP_VERSIONS:]
            self._entries.move_to_end(task_id)
            while len(self._entries) > self.max_tasks:
                self._entries.popitem(last=False)
            return entry
        raise BundleError(f"task {task_id!r} is being rewritten continuously; retry the request")

    def by_key(self, key: str) -> TaskEntry:
        """The exact version `task_state` resolved (`id@version`).

        Raises:
            InvalidInput: a malformed key, or the version was replaced twice since (retry the request).
        """
        task_id, sep, version = key.partition("@")
        if not sep:
            raise InvalidInput(f"task key {key!r} is not 'id@version'; send requests through the classify ensemble")
        cached = self._find(task_id, version)
        if cached is not None:
            return cached
        entry = self.resolve(task_id)
        if entry.version != version:
            raise InvalidInput(f"task {task_id!r} was replaced while this request was in flight; retry the request")
        return entry

    def _find(self, task_id: str, version: str) -> TaskEntry | None:
        for e in self._entries.get(task_id, []):
            if e.version == version:
                self._entries.move_to_end(task_id)
                return e
        return None

    def _load(self, task_id: str, path: Path, version: str) -> TaskEntry:
        try:
            artefact = TaskArtefact.load(path)
        except (BundleError, InvalidInput) as exc:
            raise BundleError(f"task {task_id!r} in the store is unusable: {exc}") from None
        if artefact.bundle_id != self.bundle_id:
            raise BundleError(
                f"task {task_id!r} was fitted on bundle {artefact.bundle_id[:12]} ({artefact.model}), not this "
                f"repository's {self.bundle_id[:12]}; re-adapt it on this bundle"
            )
        if "graph" in artefact.task_state and not self.folded:
            raise BundleError(
                f"task {task_id!r} carries its own folded graph (TSA / BN-affine), but this repository's features model "
                "is one shared graph; serve it from a repository exported with --backend python"
            )
        if self.gamma_size is not None:
            gamma = artefact.task_state.get("gamma")
            if gamma is None or np.asarray(gamma).shape != (self.gamma_size,):
                shape = None if gamma is None else np.asarray(gamma).shape
                raise BundleError(f"task {task_id!r} has γ of shape {shape}, expected ({self.gamma_size},); re-adapt it on this bundle")
        if "graph" in artefact.task_state and not self.keep_graphs:
            artefact = replace(artefact, task_state={**artefact.task_state, "graph": np.zeros(0, np.uint8)})
        return TaskEntry(task_id, version, artefact)


def add_task(tasks_dir: str | Path, task_id: str, artefact: TaskArtefact | str | Path) -> Path:
    """Put a task into a store atomically (replacing one with the same id); a serving server sees it at once."""
    target = Path(tasks_dir) / f"{check_task_id(task_id)}.npz"
    task = artefact if isinstance(artefact, TaskArtefact) else TaskArtefact.load(artefact)
    return task.save(target)


def remove_task(tasks_dir: str | Path, task_id: str) -> None:
    """Delete a task from a store; requests for it then get an unknown-task error.

    Raises:
        UnknownTask: no such task.
    """
    target = Path(tasks_dir) / f"{check_task_id(task_id)}.npz"
    try:
        target.unlink()
    except FileNotFoundError:
        raise UnknownTask(f"unknown task id {task_id!r} in {tasks_dir}; nothing removed") from None


def describe(entry: TaskEntry) -> dict[str, Any]:
    """Small JSON-able summary of a task."""
    a = entry.artefact
    return {"task": entry.task_id, "classes": list(a.classes), "head": a.info.get("head"), "version": entry.version}
