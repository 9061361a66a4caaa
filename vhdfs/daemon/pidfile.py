"""``-o pidfile=PATH``: the daemon's PID, for scripts and tests that must wait for its exit.

Written atomically once the mount is served, before ``vhdfs`` returns; removed when the
daemon exits, unless another process has replaced it meanwhile.

The folder may be writable by others (a group-writable run folder without the sticky bit,
where the kernel's ``protected_symlinks`` does not apply). So no name is ever opened by path
for writing: the PID goes into a new file of an unpredictable name made with ``O_EXCL``
(``mkstemp``), which is then renamed over PATH. A rename replaces a symlink planted at PATH
instead of following it, and PATH is read back with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile

from vhdfs.errors import UsageError

log = logging.getLogger(__name__)


def check_pidfile(path: str) -> str:
    """Return ``path`` made absolute (the daemon leaves the working directory).

    Raises:
        UsageError: Its folder does not exist or cannot be written, or it is a directory.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(path, "pidfile: its folder does not exist or cannot be written")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise UsageError(path, "pidfile: is a directory")
    return path


def write_pidfile(path: str) -> bool:
    """Write this process's PID to ``path``; on failure log one line and return False."""
    folder, name = os.path.split(path)
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(f"{os.getpid()}\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.error("%s: cannot write the pidfile: %s", path, exc.strerror)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return False
    return True


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it is still the file holding this process's PID."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            if f.read(32).strip() != str(os.getpid()):
                return
        os.unlink(path)
