"""Owner-tagged temp names, and removal of temps whose owner is provably dead.

A writer names its temp `.NAME.p<pid>h<host>-XXXX.tmp` (`temp_prefix`). A process killed with SIGKILL (or
by the OOM killer, or a power cut) cannot clean up, so the next writer in that folder calls `sweep`: a
temp whose host is this machine and whose pid no longer exists is removed. Nothing else is ever touched:
temps of live processes, of other hosts (a shared file system) and names fsdeploy did not make are kept.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
from pathlib import Path

# The old folder, parked while the new one moves in where the OS cannot swap two names in one step.
PARKED_SUFFIX = "parked.tmp"
_TEMP = re.compile(r"^\.(?P<name>.+)\.p(?P<pid>\d+)h(?P<host>[0-9a-f]{8})-(?P<rest>.*)\.tmp$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(name: str) -> str:
    """Prefix for a temp beside `name`, tagged with this process and host."""
    return f".{name}.p{os.getpid()}h{_host_tag()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def dead_temps(folder: str | os.PathLike[str]) -> list[tuple[Path, str, str]]:
    """(path, target name, kind) of every temp in `folder` whose owner is gone; kind is `parked` or `temp`."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    host = _host_tag()
    out = []
    for e in entries:
        m = _TEMP.match(e.name)
        if m is None or m["host"] != host or pid_alive(int(m["pid"])):
            continue
        out.append((Path(e.path), m["name"], "parked" if m["rest"] == PARKED_SUFFIX[: -len(".tmp")] else "temp"))
    return out


def sweep(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove dead temps in `folder` (not recursive); a parked old folder whose target is missing is put back.

    Returns:
        The paths removed or restored. Errors are ignored: sweeping must never fail a write.
    """
    done = []
    for path, name, kind in dead_temps(folder):
        target = path.with_name(name)
        try:
            if kind == "parked" and not (target.exists() or target.is_symlink()):
                os.replace(path, target)  # the process died between its two renames: the old output returns
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            done.append(path)
        except OSError:
            continue
    return done


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing names in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
