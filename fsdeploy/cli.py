"""The `fsdeploy` command line: a thin Typer hub over the library.

Each area adds its commands from `fsdeploy/commands/<area>.py` through `register(app)`; this module only
connects them and turns library errors into one line on stderr with a non-zero exit, in one place.
"""
from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from fsdeploy.errors import FsdeployError

app = typer.Typer(
    name="fsdeploy",
    help=(
        "Take few-shot image classifiers from research code to edge GPUs.\n\n"
        "Typical flow: `fsdeploy export efficientnet_b0 --out bundle` (ONNX graphs validated against "
        "PyTorch), `fsdeploy adapt bundle support/ --out task.npz` (fit a per-task head on engine features), "
        "`fsdeploy predict bundle task.npz img.png`. `fsdeploy demo` runs the whole path on shipped data."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules under fsdeploy/commands that contribute commands; order is the order in --help.
_COMMAND_MODULES = ("demo", "core", "heads", "data", "train", "distill", "quantize", "tune", "tensorrt", "bench", "triton")

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"fsdeploy.commands.{_name}")
    except ModuleNotFoundError as _exc:  # an area not written yet must not break the others
        if _exc.name != f"fsdeploy.commands.{_name}":
            raise
        continue
    _mod.register(app)


def unwrap(text: str) -> str:
    """Help text as paragraphs of one line each: the docstrings are wrapped at 120 columns in the source, and
    Typer's rich help keeps single line breaks, so at 80 columns they broke lines mid-sentence. Indented lines
    (command examples) keep their own line."""
    paragraphs = []
    for para in text.strip().split("\n\n"):
        lines: list[str] = []
        for line in para.splitlines():
            if lines and not line.startswith(" "):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _unwrap_help(group: typer.Typer) -> None:
    """Unwrap the help of every command and sub-group of `group` (see `unwrap`)."""
    import inspect

    for info in group.registered_commands:
        doc = info.help or inspect.getdoc(info.callback)
        if doc:
            info.help = unwrap(doc)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _unwrap_help(sub.typer_instance)


_unwrap_help(app)


def _print_version(value: bool) -> None:
    if value:
        from fsdeploy import __version__

        typer.echo(f"fsdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only results (--json lines), warnings and errors: no tables or progress.")] = False,
) -> None:
    """Take few-shot image classifiers from research code to edge GPUs."""
    if quiet:
        from fsdeploy import clirun

        clirun.set_quiet()


def main() -> None:
    """Console-script entry point: run the app, report FsdeployError as one line, exit 1."""
    from fsdeploy import clirun

    clirun.prepare()
    try:
        rc = app(standalone_mode=False)
        # typer returns the code of a raised Exit (130 for an interrupt) instead of exiting with it
        if isinstance(rc, int) and rc:
            clirun.exit_for_code(rc)
    except KeyboardInterrupt:  # an interrupt outside the command (parsing, imports)
        clirun.exit_for_code(130)
    except FsdeployError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # usage errors arrive here with standalone_mode=False
        # typer >= 0.29 vendors its own click, so match click's exception shape rather than its class
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            clirun.usage_error(exc)
        clirun.unexpected(exc)


if __name__ == "__main__":
    main()
