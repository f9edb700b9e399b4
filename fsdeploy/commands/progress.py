"""Progress for long steps: a rich spinner on a terminal, plain timestamped lines in logs and pipes.

A spinner written to a file or a CI log is either invisible or a mess of control codes; a script reading
`--json` from stdout must get nothing else there. So progress goes to stderr as plain lines when stderr is
not a terminal, and nowhere under `--quiet`.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console

QUIET = False  # set by `fsdeploy --quiet`


class _Lines:
    """`status.update(msg)` as one stderr line per message, with the time since the start."""

    def __init__(self, first: str) -> None:
        self.t0 = time.perf_counter()
        self.update(first)

    def update(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


class _Silent:
    def update(self, msg: str) -> None:
        pass


@contextlib.contextmanager
def progress(console: Console, first: str) -> Iterator[object]:
    """Yield an object with `.update(msg)`: a spinner on a terminal, plain stderr lines otherwise.

    Args:
        console: the command's console (quiet consoles show nothing).
        first: the first message.
    """
    if console.quiet or QUIET:
        yield _Silent()
    elif console.is_terminal:
        with Console(stderr=True).status(first) as status:
            yield status
    else:
        yield _Lines(first)
