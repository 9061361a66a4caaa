"""``-o pidfile=PATH``: the daemon's PID, for scripts and tests that must wait for its exit.

Written (atomically) once the mount is served, before ``vhdfs`` returns; removed when the
daemon exits, unless another process has replaced it meanwhile.
"""

from __future__ import annotations

import contextlib
import os

from vhdfs.errors import UsageError


def check_pidfile(path: str) -> str:
    """Return ``path`` made absolute (the daemon leaves the working directory).

    Raises:
        UsageError: Its folder does not exist or cannot be written.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(path, "pidfile: its folder does not exist or cannot be written")
    return path


def write_pidfile(path: str) -> None:
    """Write this process's PID to ``path``."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(temporary, path)


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still holds this process's PID."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
