"""Step reports from long loops (a TSA fit, a latency sweep) to whoever is listening, usually the CLI's progress line.

A loop deep in the library calls `step("TSA fit", i, n, "loss 1.23")`; a command wraps its call in
`with reporting(fn):` to receive them. Nothing listens by default, so library users and tests pay nothing,
and no callback has to be threaded through every layer in between. Context-local (contextvars).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Reporter = Callable[[str, int, int, str], None]  # (what, done, total, detail)
_REPORTER: ContextVar[Reporter | None] = ContextVar("fsdeploy_step_reporter", default=None)


@contextlib.contextmanager
def reporting(fn: Reporter) -> Iterator[None]:
    """Send every `step(...)` made inside the block to `fn`."""
    token = _REPORTER.set(fn)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def step(what: str, done: int, total: int, detail: str = "") -> None:
    """Report that `done` of `total` units of `what` are finished (no-op when nobody listens)."""
    fn = _REPORTER.get()
    if fn is not None:
        fn(what, done, total, detail)
