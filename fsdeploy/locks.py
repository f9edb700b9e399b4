"""A file lock around a bundle manifest's read-modify-write.

`fsdeploy build` and `fsdeploy quantize` both add records to one `manifest.json`. Each write is atomic, but
without a lock two writers read the same old manifest and the second write drops the first one's record
(an engine file on disk that the manifest no longer lists). Writers take `manifest_lock(folder)`, re-read
the manifest inside it, apply their change and write. `flock` is released by the kernel when its holder
dies, so a killed writer never leaves the bundle locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".manifest.lock"


@contextlib.contextmanager
def manifest_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `folder`'s manifest for the block (waits for other holders).

    The lock file stays in the folder: deleting it while another process waits on it would let a third
    process lock a new file of the same name, so two writers would run at once.

    Args:
        folder: the bundle folder.
    """
    fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
