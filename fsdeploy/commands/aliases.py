"""Old option spellings, kept working for a while as hidden aliases of the new ones.

One spelling per idea across commands (README "Command-line conventions"). When an option is renamed,
its command is declared with `cls=renamed({"--old": "--new"})`: the old spelling is rewritten to the new
one before parsing, is absent from `--help`, and each use prints one note on stderr (never stdout, which
`--json` keeps for results).
"""
from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand


def note(old: str, new: str) -> None:
    """The one-line deprecation note for `old`, on stderr."""
    typer.echo(f"note: {old} is now spelled {new}; the old spelling still works but will be removed", err=True)


def rewrite(args: list[str], renames: dict[str, str]) -> list[str]:
    """`args` with every old option name (also `--old=value`) replaced by its new one; `--` ends options."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if name in renames:
            note(name, renames[name])
            arg = renames[name] + eq + value
        out.append(arg)
    return out


def renamed(renames: dict[str, str]) -> type[TyperCommand]:
    """A command class that accepts the old spellings in `renames` (old -> new) as hidden aliases."""

    class Renamed(TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, rewrite(list(args), renames))

        def collect_usage_pieces(self, ctx: Any) -> list[str]:
            """The usage line without hidden (old-spelling) arguments."""
            pieces = [self.options_metavar] if self.options_metavar else []
            for param in self.get_params(ctx):
                if not getattr(param, "hidden", False):
                    pieces.extend(param.get_usage_pieces(ctx))
            return pieces

    Renamed.renames = dict(renames)  # type: ignore[attr-defined]
    return Renamed


def calib_folder(calib: Any, positional: Any, command: str) -> Any:
    """`--calib DIR`, or the former positional CALIB_DIR (with a note); exactly one of them.

    Raises:
        InvalidInput: neither or both given.
    """
    from fsdeploy.errors import InvalidInput

    if calib is not None and positional is not None:
        raise InvalidInput(f"{command}: give the images once, as --calib DIR (the positional CALIB_DIR is the old spelling)")
    if positional is not None:
        typer.echo(f"note: `fsdeploy {command} BUNDLE CALIB_DIR` is now spelled `fsdeploy {command} BUNDLE --calib CALIB_DIR`; "
                   "the old spelling still works but will be removed", err=True)
        return positional
    if calib is None:
        raise InvalidInput(f"{command} needs your images: --calib DIR (real images like those you will classify)")
    return calib
