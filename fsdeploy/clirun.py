"""What the console entry point does around the Typer app: signals, warnings, exit codes, one-line errors.

Kept out of `cli.py` so the hub stays a list of command modules. Every way out of `fsdeploy` ends here:
an interrupt (SIGINT or SIGTERM) exits 128 + signal with one line saying what was written; a usage error
is one line and exit 2; a library error one line and exit 1; an OS error (disk full, permission) one line
naming the file; anything else one line saying it is a bug, with the traceback only on request.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import NoReturn

import typer

from fsdeploy import interrupts
from fsdeploy.errors import FsdeployWarning

INTERRUPTED = 130  # what typer returns for a KeyboardInterrupt
TRACEBACK_ENV = "FSDEPLOY_TRACEBACK"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
    """One line per warning on stderr; fsdeploy's own are yellow, others name their kind."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    if issubclass(category, FsdeployWarning):
        typer.secho(f"warning: {text}", fg=typer.colors.YELLOW, err=True)
    else:
        typer.echo(f"warning ({category.__name__}): {text}", err=True)


def prepare() -> None:
    """Install the SIGTERM handler and the one-line warning display."""
    interrupts.install_sigterm()
    warnings.showwarning = _show_warning


def _out_argument(argv: list[str]) -> str | None:
    """The value of --out/-o on the command line, if any."""
    for i, arg in enumerate(argv):
        if arg in ("--out", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def interrupt_message(argv: list[str]) -> str:
    """The line printed when a signal stopped the command."""
    out = _out_argument(argv)
    if out is None:
        return "interrupted; nothing half-written was left behind (finished steps are kept; re-run to complete)"
    if os.path.abspath(out) in interrupts.committed:
        return f"interrupted after {out} was written completely"
    return f"interrupted; nothing written to {out}"


def exit_for_code(rc: int) -> NoReturn:
    """Exit with `rc`; an interrupt first prints its one line and exits 128 + the signal number."""
    if rc == INTERRUPTED:
        typer.secho(interrupt_message(sys.argv[1:]), fg=typer.colors.YELLOW, err=True)
        sys.exit(interrupts.exit_status())
    sys.exit(rc)


def usage_error(exc: Exception) -> NoReturn:
    """A click usage error (bad option value, unknown option) as one line, exit 2 (help screens stay whole)."""
    code = int(getattr(exc, "exit_code", 2))
    if type(exc).__name__ == "NoArgsIsHelpError" or not hasattr(exc, "format_message"):
        exc.show()  # type: ignore[attr-defined]
        sys.exit(code)
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    typer.secho(f"error: {message}{where}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def unexpected(exc: BaseException) -> NoReturn:
    """An exception fsdeploy did not turn into an FsdeployError: one line, and the traceback on request."""
    if os.environ.get(TRACEBACK_ENV):
        traceback.print_exception(exc)
    if isinstance(exc, MemoryError):
        line = "out of memory; use fewer or smaller images, a smaller --batch, or a machine with more memory"
    elif isinstance(exc, OSError) and exc.strerror:
        target = f" {exc.filename}" if exc.filename else ""
        line = f"cannot access{target}: {exc.strerror}; free space or fix permissions, then re-run"
    else:
        first = str(exc).splitlines()[0] if str(exc) else ""
        line = (
            f"unexpected {type(exc).__name__}: {first} — this is a bug in fsdeploy; re-run with "
            f"{TRACEBACK_ENV}=1 and report the traceback"
        )
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    sys.exit(1)


def set_quiet() -> None:
    """`fsdeploy --quiet`: silence the rich consoles of every command module (tables, spinners, 'wrote' lines)."""
    from fsdeploy.commands import progress

    progress.QUIET = True
    for name, mod in list(sys.modules.items()):
        if name.startswith("fsdeploy.commands."):
            for attr in ("console", "err"):  # tables and 'wrote' lines; notes on stderr
                if hasattr(getattr(mod, attr, None), "quiet"):
                    getattr(mod, attr).quiet = True
