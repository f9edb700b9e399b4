"""One registry helper for every concept with named implementations: heads, transforms, engines, adapter kinds.

A `Registry` is a name -> object table filled at import (through `register`) and read-only afterwards. It
refuses a name registered twice, names the known entries when a lookup fails, and lists them for `--help`.
Registries whose entries live in modules that are costly to import (torch blocks, optional backends) take a
`load` hook: it runs once, before the first lookup or listing, and imports those modules.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fsdeploy.errors import RegistryError, UnknownName

T = TypeVar("T")
O = TypeVar("O")


class Registry(Generic[T]):
    """Named implementations of one concept.

    Args:
        what: the concept, as users read it in errors ("head", "engine backend", "adapter kind").
        load: imports the modules that register the built-in entries (called once, lazily).
    """

    def __init__(self, what: str, load: Callable[[], None] | None = None, *, stamp: str = "") -> None:
        self.what = what
        self.stamp = stamp  # attribute `register` sets to the entry's name (classes that carry their name)
        self._entries: dict[str, T] = {}
        self._load = load
        self._loading = False

    def _ensure_loaded(self) -> None:
        if self._load is not None and not self._loading:
            self._loading = True
            load, self._load = self._load, None
            try:
                load()
            except BaseException:
                self._load = load  # retry next time (e.g. after an optional package is installed)
                raise
            finally:
                self._loading = False

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`.

        Raises:
            RegistryError: `name` is taken.
        """
        if name in self._entries:
            raise RegistryError(f"{self.what} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str, hook: Callable[[str, O], None] | None = None) -> Callable[[O], O]:
        """Decorator form of `add`; `hook(name, obj)` runs first (e.g. to stamp the name on a class)."""

        def add(obj: O) -> O:
            if self.stamp:
                setattr(obj, self.stamp, name)
            if hook is not None:
                hook(name, obj)
            self.add(name, obj)  # type: ignore[arg-type]
            return obj

        return add

    def get(self, name: str, hint: str = "") -> T:
        """The entry called `name`.

        Raises:
            UnknownName: no such entry; the message lists the known names (and `hint`, e.g. a fix).
        """
        self._ensure_loaded()
        if name not in self._entries:
            raise UnknownName(f"unknown {self.what} {name!r}; known: {self.listing()}{'; ' + hint if hint else ''}")
        return self._entries[name]

    def create(self, name: str, **opts: object) -> object:
        """Instantiate the class registered as `name` with `opts`."""
        return self.get(name)(**opts)  # type: ignore[operator]

    def from_state(self, state: object, key: str) -> object:
        """Rebuild an entry from a saved state dict that names its class under `key` (e.g. a task artefact's head)."""
        name = str(state[key])  # type: ignore[index]
        return self.get(name, "the file was written by another fsdeploy; re-create it").from_state(state)  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._ensure_loaded()
        return sorted(self._entries)

    def listing(self, sep: str = ", ") -> str:
        """The names joined for a message or `--help` text."""
        return sep.join(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def remove(self, name: str) -> None:
        """Drop an entry (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)


def import_package_modules(package: str, *, skip: tuple[str, ...] = (), optional: bool = False) -> None:
    """Import every module of `package` (so the entries they register exist): a new entry is one new file.

    Args:
        skip: module names not to import (helpers that register nothing and are costly to load).
        optional: a module whose own optional dependency is missing is left out rather than failing.
    """
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in skip:
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except ModuleNotFoundError as exc:
            if not optional or (exc.name or "").startswith("fsdeploy"):
                raise
