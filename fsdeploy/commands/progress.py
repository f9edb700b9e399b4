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


LINE_EVERY_S = 5.0  # plain-line mode: at most one line per this many seconds for repeated counts


class _Lines:
    """`status.update(msg)` as one stderr line per message, with the time since the start."""

    def __init__(self, first: str) -> None:
        self.t0 = time.perf_counter()
        self.last = -LINE_EVERY_S
        self.update(first)

    def update(self, msg: str, *, often: bool = False) -> None:
        """Print `msg`; with `often` (a count that changes every step) only every LINE_EVERY_S seconds."""
        now = time.perf_counter() - self.t0
        if often and now - self.last < LINE_EVERY_S:
            return
        self.last = now
        print(f"[{now:6.1f} s] {msg}", file=sys.stderr, flush=True)


class _Spinner:
    """A rich status on stderr; `often` makes no difference to a spinner."""

    def __init__(self, status: object) -> None:
        self.status = status

    def update(self, msg: str, *, often: bool = False) -> None:
        self.status.update(msg)  # type: ignore[attr-defined]


class _Silent:
    def update(self, msg: str, *, often: bool = False) -> None:
        pass


@contextlib.contextmanager
def progress(console: Console, first: str) -> Iterator[object]:
    """Yield an object with `.update(msg)`: a spinner on a terminal, plain stderr lines otherwise.

    Args:
        console: the command's console (quiet consoles show nothing).
        first: the first message.
    """
    err = Console(stderr=True)
    if console.quiet or QUIET:
        yield _Silent()
    elif err.is_terminal:  # progress lives on stderr: its being a terminal decides
        with err.status(first) as status:
            yield _Spinner(status)
    else:
        yield _Lines(first)


@contextlib.contextmanager
def progress_steps(console: Console, first: str) -> Iterator[object]:
    """`progress`, also showing every `fsdeploy.steps.step(...)` made inside the block (e.g. TSA fit steps).

    A count's last step is always shown; the others on a spinner at once, as plain lines every few seconds.
    """
    from fsdeploy.steps import reporting

    with progress(console, first) as status:
        def show(what: str, done: int, total: int, detail: str) -> None:
            msg = f"{what}: step {done}/{total}" + (f", {detail}" if detail else "")
            status.update(msg, often=done not in (1, total))  # type: ignore[attr-defined]

        with reporting(show):
            yield status


class _Counts:
    """rich.progress.Progress's add_task/advance as throttled stderr lines."""

    def __init__(self, lines: _Lines | _Silent) -> None:
        self.lines, self.tasks = lines, {}  # type: ignore[var-annotated]

    def add_task(self, description: str, total: int) -> int:
        self.tasks[len(self.tasks)] = [description, 0, total]
        return len(self.tasks) - 1

    def advance(self, task: int, n: int = 1) -> None:
        rec = self.tasks[task]
        rec[1] += n
        self.lines.update(f"{rec[0]}: {rec[1]}/{rec[2]}", often=rec[1] < rec[2])


@contextlib.contextmanager
def counting(console: Console, first: str) -> Iterator[object]:
    """Yield an object with rich Progress's `add_task(description, total)` and `advance(task, n)`: a bar on a
    terminal stderr, plain throttled lines otherwise, nothing under --quiet. Never writes to stdout."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    if console.quiet or QUIET:
        yield _Counts(_Silent())
    elif err.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            yield bar
    else:
        yield _Counts(_Lines(first))
