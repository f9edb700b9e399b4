"""Interrupts: SIGTERM unwinds like Ctrl-C, and commit points are not cut in half by either.

Python turns SIGINT into KeyboardInterrupt, so every `finally` (the atomic writers' temp clean-up) runs.
SIGTERM (what `kill`, systemd and CI runners send) would kill the process on the spot and leave temp folders
behind; `install_sigterm` makes it raise `Terminated`, a KeyboardInterrupt, so both unwind the same way.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_STOPPING = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread so clean-up code runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


# The signal that last stopped the process (read by the CLI to pick the exit status). A module value
# because typer swallows the exception and returns only 130.
last_signal: int | None = None
# Targets the atomic writers have committed in this process, so an interrupt that lands after a commit is
# not reported as "nothing written".
committed: set[str] = set()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global last_signal
    last_signal = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def install_sigterm() -> None:
    """Make SIGINT and SIGTERM raise in the main thread (call once, from the console entry point)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _STOPPING:
        signal.signal(sig, _on_signal)


def exit_status() -> int:
    """Shell convention for a process stopped by a signal: 128 + signal number (130 for Ctrl-C)."""
    return 128 + (last_signal or signal.SIGINT)


def mark_committed(target: object) -> None:
    """Note that `target` was replaced by a finished artefact."""
    import os

    committed.add(os.path.abspath(str(target)))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, so a rename pair or a manifest commit is never half done.

    A signal that arrives inside the block is delivered (and raises) right after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
