"""Daemonizing after the mount is ready, the way libfuse's ``fuse_daemonize`` does it.

``pyfuse3.init`` has already mounted the file system when ``detach`` runs. It forks before
trio starts (trio must never be forked with threads running). The parent waits on a pipe:
the child writes ``ready`` from inside the trio loop just before it starts serving. The parent
then reads the first sector of every raw file, which blocks until the child answers, and exits
0, so the next shell command can use the raw files. If the child reports an
error or dies first, the parent prints the error, unmounts and exits non-zero.
"""

from __future__ import annotations

import os
import sys

import pyfuse3

from vhdfs.errors import ExitCode


class StartupPipe:
    """The child's end of the status pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def ready(self) -> None:
        """Tell the parent that the mount is being served; detach from the terminal."""
        os.write(self._fd, b"ready\n")
        os.close(self._fd)
        self._fd = -1
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        os.close(devnull)

    def failed(self, message: str, code: int) -> None:
        """Tell the parent why the child gives up (before ``ready``)."""
        if self._fd >= 0:
            os.write(self._fd, f"error {code} {message}\n".encode(errors="replace"))
            os.close(self._fd)
            self._fd = -1


def detach(mountpoint: str, raw_paths: list[str]) -> StartupPipe:
    """Fork; return in the child only. The parent exits with the start-up status."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        os.chdir("/")
        return StartupPipe(write_end)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    status = b"".join(chunks).decode(errors="replace").strip()
    code = _parent_outcome(status, mountpoint, raw_paths)
    sys.stderr.flush()
    os._exit(code)


def _parent_outcome(status: str, mountpoint: str, raw_paths: list[str]) -> int:
    if status == "ready":
        try:
            for path in raw_paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.pread(fd, 512, 0)
                finally:
                    os.close(fd)
        except OSError as exc:
            print(f"vhdfs: {mountpoint}: mount did not come up: {exc.strerror}", file=sys.stderr)
            pyfuse3.close(unmount=True)
            return ExitCode.MOUNT_FAILED
        return ExitCode.OK
    if status.startswith("error "):
        _, code, message = status.split(" ", 2)
        print(f"vhdfs: {message}", file=sys.stderr)
        pyfuse3.close(unmount=True)
        return int(code)
    print(f"vhdfs: {mountpoint}: the daemon exited during start-up", file=sys.stderr)
    pyfuse3.close(unmount=True)
    return ExitCode.MOUNT_FAILED
