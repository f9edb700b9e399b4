"""`adapt --head` / `--head-opt`: the heads and their options, read from the head registry's constructors.

The keys and types come from each head class's `__init__` signature and defaults, so the help and the
checks can never drift from the heads themselves. `simpleshot` is the method name bench and demo use for
NCC on CL2N features; `adapt` accepts it too.
"""
from __future__ import annotations

import inspect
from typing import Any

from fsdeploy.errors import InvalidInput

# method name -> (head, transform): names that bench/demo accept and that are a head + transform pair
METHOD_ALIASES: dict[str, tuple[str, str]] = {"simpleshot": ("ncc", "cl2n")}
_SKIP = {"self", "seed", "init"}  # seed has its own --seed; init is an array, not a command-line value


def head_options(head: str) -> dict[str, Any]:
    """KEY -> default of every command-line option of `head`.

    Raises:
        InvalidInput: `head` is not a registered head.
    """
    from fsdeploy.heads import HEADS

    if head not in HEADS:
        known = ", ".join([*sorted(HEADS), *METHOD_ALIASES])
        raise InvalidInput(f"unknown head {head!r}; known: {known} (see `fsdeploy heads`)")
    params = inspect.signature(HEADS[head].__init__).parameters.values()
    return {p.name: p.default for p in params if p.name not in _SKIP and p.default is not inspect.Parameter.empty}


def resolve_method(head: str, transform: str) -> tuple[str, str]:
    """`simpleshot` -> (ncc, cl2n); any other name unchanged.

    Raises:
        InvalidInput: an alias combined with a different --transform.
    """
    if head not in METHOD_ALIASES:
        return head, transform
    base, base_transform = METHOD_ALIASES[head]
    if transform not in ("none", base_transform):
        raise InvalidInput(f"--head {head} is {base} on {base_transform} features; drop --transform {transform} or use --head {base}")
    return base, base_transform


def check_head_options(head: str, opts: dict[str, object]) -> dict[str, object]:
    """Check `--head-opt` keys and value types against `head`'s constructor; ints are accepted for floats.

    Raises:
        InvalidInput: an unknown key or a value of the wrong type (the message lists the valid keys).
    """
    known = head_options(head)
    out: dict[str, object] = {}
    for key, value in opts.items():
        if key not in known:
            listing = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
            raise InvalidInput(f"--head-opt {key}: head {head!r} has no option {key!r}; its options (defaults): {listing}")
        default = known[key]
        want = type(default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise InvalidInput(
                f"--head-opt {key}={value}: head {head!r} wants {want.__name__} for {key} (default {default}); "
                f"e.g. --head-opt {key}={default}"
            )
        out[key] = value
    return out


def options_help() -> str:
    """One line per head with its `--head-opt` keys and defaults, for `adapt --help`."""
    from fsdeploy.heads import HEADS

    lines = [f"{name}: " + (", ".join(f"{k}={v}" for k, v in head_options(name).items()) or "no options") for name in HEADS]
    lines += [f"{alias}: {base} on {tr} features (options of {base})" for alias, (base, tr) in METHOD_ALIASES.items()]
    return "; ".join(lines)
