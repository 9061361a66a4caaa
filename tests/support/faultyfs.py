"""A host file system that fails on command: the disk under vhdfs returning real errors.

    python -m tests.support.faultyfs BACKING MOUNTPOINT CONTROL

A pyfuse3 pass-through of the flat folder BACKING (regular files only), mounted at MOUNTPOINT
with direct I/O, so that every read, write and fsync of vhdfs reaches it. The file CONTROL says
which operations fail and how, one ``operation=ERRNO`` per line (``write=EIO``, ``fsync=EIO``,
``read=EIO``, ``write=EROFS``, ``write=ENOSPC``); it is re-read whenever it changes, and an
empty file makes everything succeed again. The kernel hands these errors to vhdfs exactly as a
failing disk or a file system forced read-only would (device-mapper, the usual tool, is not
available in every kernel).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tests.support.mounting import is_mounted


class FaultyFs(pyfuse3.Operations):
    """Pass-through of one flat folder, with injected errors."""

    def __init__(self, backing: str, control: str) -> None:
        super().__init__()
        self.backing = backing
        self.control = control
        self.faults: dict[str, int] = {}
        self._control_mtime = -1.0
        self.names: dict[int, str] = {}
        self.inodes: dict[str, int] = {}

    # -- faults ----------------------------------------------------------------------------

    def _fail(self, operation: str) -> None:
        try:
            mtime = os.stat(self.control).st_mtime
        except FileNotFoundError:
            mtime = 0.0
        if mtime != self._control_mtime:
            self._control_mtime = mtime
            self.faults = {}
            if mtime:
                with open(self.control) as f:
                    for line in f:
                        if "=" in line:
                            name, code = line.strip().split("=", 1)
                            self.faults[name] = getattr(errno, code.strip())
        code = self.faults.get(operation)
        if code is not None:
            raise pyfuse3.FUSEError(code)

    # -- names -----------------------------------------------------------------------------

    def _inode(self, name: str) -> int:
        inode = self.inodes.get(name)
        if inode is None:
            inode = self.inodes[name] = len(self.inodes) + pyfuse3.ROOT_INODE + 1
            self.names[inode] = name
        return inode

    def _path(self, inode: int) -> str:
        return os.path.join(self.backing, self.names[inode])

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        path = self.backing if inode == pyfuse3.ROOT_INODE else self._path(inode)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        attr = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks"):
            setattr(attr, field, getattr(st, field))
        attr.st_ino = inode
        attr.st_blksize = 4096
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = (
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        attr.attr_timeout = attr.entry_timeout = 0
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if parent != pyfuse3.ROOT_INODE or "/" in text:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not os.path.lexists(os.path.join(self.backing, text)):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(self._inode(text))

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        names = sorted(os.listdir(self.backing))
        for position, name in enumerate(names[start_id:], start_id + 1):
            attr = self._attributes(self._inode(name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, position):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    # -- files -----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        with _errno_of_os_errors():
            if not stat.S_ISREG(os.lstat(self._path(inode)).st_mode):
                raise pyfuse3.FUSEError(errno.EACCES)
            fd = os.open(self._path(inode), flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._fail("read")
        with _errno_of_os_errors():
            return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._fail("write")
        with _errno_of_os_errors():
            return os.pwrite(fh, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._fail("fsync")
        with _errno_of_os_errors():
            os.fsync(fh)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        os.close(fh)


@contextlib.contextmanager
def _errno_of_os_errors() -> Iterator[None]:
    """Answer a real failure of the backing folder with its errno (pyfuse3 takes FUSEError
    only; anything else leaves the request unanswered)."""
    try:
        yield
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


async def _serve() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                async for _ in signals:
                    pyfuse3.terminate()

            nursery.start_soon(stop)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def running(backing: Path, mountpoint: Path, control: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run faultyfs in a process of its own until the block ends; yield it once mounted.

    Stopped afterwards by that PID only (terminate, then kill), and unmounted lazily if its
    mount outlived it.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.faultyfs", backing, mountpoint, control],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(str(mountpoint)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"faultyfs did not mount: {process.communicate()[1]!r}")
            time.sleep(0.02)
        yield process
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        if is_mounted(str(mountpoint)):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def main() -> None:
    backing, mountpoint, control = sys.argv[1:4]
    options = set(pyfuse3.default_options) | {"fsname=faultyfs"}
    pyfuse3.init(FaultyFs(backing, control), mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
