"""HostFile: one open image file, with positional I/O that checks for short reads.

Every error names the file. Writes are positional (``pwrite``) so no shared seek offset exists;
the file size is tracked here because allocation decisions depend on it.

Locks speak QEMU's protocol, so that vhdfs and QEMU (qemu-img, qemu-io, a VM) see each other:
one-byte OFD read locks (``F_OFD_SETLK``) at 100+n for each permission held and at 200+n for
each permission not shared. A writer holds consistent read, write and resize and shares
neither write nor resize; a reader holds consistent read and shares neither. So readers
coexist with readers, vhdfs's and QEMU's, and a writer is refused by anyone and refuses
everyone, both ways. OFD locks belong to the open file description: unlike classic POSIX
locks they are not dropped when some other descriptor of the same file in this process is
closed.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from typing import Self

from vhdfs.errors import HostIOError, ImageAccessError, ImageBusyError, TruncatedImageError

_IOV_MAX = os.sysconf("SC_IOV_MAX")

# QEMU's locking protocol (block/file-posix.c): permission n held -> a read lock on byte 100+n;
# permission n not shared with others -> a read lock on byte 200+n. Conflicts are found by
# testing for any lock on the opposite byte. Permissions: 0 consistent read, 1 write,
# 2 write unchanged, 3 resize.
_PERM_BASE = 100
_SHARED_BASE = 200
_CONSISTENT_READ, _WRITE, _RESIZE = 0, 1, 3
#: (held, unshared) of a writer and of a reader, as QEMU's own writers and readers take them.
_WRITER = ((_CONSISTENT_READ, _WRITE, _RESIZE), (_WRITE, _RESIZE))
_READER = ((_CONSISTENT_READ,), (_WRITE, _RESIZE))
_FLOCK = "hhqqi4x"


def _flock(kind: int, byte: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)


_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def _check_type(path: str, st: os.stat_result) -> None:
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "a file of unknown type")
        raise ImageAccessError(path, f"{kind}, not a regular file or block device; not opened")


def _reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file (it is missing)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return "the path contains a NUL byte"


class HostFile:
    """An image file opened for positional I/O.

    Use :meth:`open`; ``__init__`` does no I/O.
    """

    __slots__ = ("fd", "path", "size", "writable")

    def __init__(self, fd: int, path: str, size: int, writable: bool) -> None:
        self.fd = fd
        self.path = path
        self.size = size
        self.writable = writable

    @classmethod
    def open(cls, path: str, *, writable: bool) -> Self:
        """Open ``path`` read-only or read-write.

        Only regular files and block devices (XenServer keeps VHDs on LVM volumes) are
        opened. The type is checked before opening, because merely opening a FIFO blocks until
        a writer comes and opening a device can have effects; the open itself does not block,
        and the descriptor is checked again, so a file swapped in between is refused too.

        Raises:
            ImageAccessError: The file does not exist, is not a regular file or block device,
                or cannot be opened.
        """
        try:
            before = os.stat(path)
        except (OSError, ValueError) as exc:  # ValueError: an embedded NUL
            raise ImageAccessError(path, f"cannot open: {_reason(exc)}") from None
        _check_type(path, before)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise ImageAccessError(path, f"cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            _check_type(path, st)
            if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
                raise ImageAccessError(path, "the file was replaced while being opened")
            os.set_blocking(fd, True)
            size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, size, writable)

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset``; shorter only at end of file."""
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise HostIOError(
                self.path, f"read of {length} bytes at {offset} failed: {exc.strerror}", exc.errno
            ) from exc
        if len(data) < length:
            # os.pread may return short on signals or huge reads; retry until EOF.
            parts = [data]
            got = len(data)
            while got < length:
                try:
                    more = os.pread(self.fd, length - got, offset + got)
                except OSError as exc:
                    raise HostIOError(
                        self.path, f"read at {offset + got} failed: {exc.strerror}", exc.errno
                    ) from exc
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Read exactly ``length`` bytes of the structure ``what`` or raise.

        Raises:
            TruncatedImageError: The file ends inside the structure.
        """
        data = self.pread(offset, length)
        if len(data) != length:
            raise TruncatedImageError(
                self.path,
                f"{what} at offset {offset} needs {length} bytes but the file ends at "
                f"{offset + len(data)}",
            )
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise HostIOError(
                    self.path,
                    f"write of {len(view)} bytes at {offset} failed: {exc.strerror}",
                    exc.errno,
                ) from exc
            finally:
                self.size = max(self.size, offset + done)

    def pwritev(self, offset: int, chunks: list[memoryview]) -> int:
        """Write the buffers one after the other from ``offset``; return the bytes written.

        One system call for up to IOV_MAX buffers, so dirty pages need not be joined first.
        """
        position = offset
        for start in range(0, len(chunks), _IOV_MAX):
            batch = chunks[start : start + _IOV_MAX]
            expected = sum(len(chunk) for chunk in batch)
            try:
                done = os.pwritev(self.fd, batch, position)
            except OSError as exc:
                raise HostIOError(
                    self.path,
                    f"write of {expected} bytes at {position} failed: {exc.strerror}",
                    exc.errno,
                ) from exc
            self.size = max(self.size, position + done)
            if done < expected:  # rare: finish the rest with plain writes
                self.pwrite(position + done, b"".join(batch)[done:])
            position += expected
        return position - offset

    def fdatasync(self) -> None:
        """Make written data (and the file length) durable."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise HostIOError(self.path, f"fdatasync failed: {exc.strerror}", exc.errno) from exc

    def lock(self, *, exclusive: bool) -> None:
        """Take QEMU's locks for a writer (``exclusive``) or a reader, without waiting.

        See the module docstring: the byte locks are taken first, then checked against what
        others hold, as QEMU does; on a conflict all of them are dropped again.

        Raises:
            ImageBusyError: Another program holds locks that conflict.
        """
        held, unshared = _WRITER if exclusive else _READER
        try:
            for byte in [_PERM_BASE + p for p in held] + [_SHARED_BASE + p for p in unshared]:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))
            tests = [_SHARED_BASE + p for p in held] + [_PERM_BASE + p for p in unshared]
            conflict = any(self._locked_by_others(byte) for byte in tests)
        except OSError as exc:
            self._unlock()
            raise HostIOError(self.path, f"cannot lock: {exc.strerror}", exc.errno) from exc
        if conflict:
            self._unlock()
            mode = "writing" if exclusive else "reading"
            raise ImageBusyError(
                self.path, f"cannot lock for {mode}: the image is in use by another program"
            )

    def _locked_by_others(self, byte: int) -> bool:
        # OFD GETLK ignores this description's own locks.
        answer = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
        kind: int = struct.unpack(_FLOCK, answer)[0]
        return kind != fcntl.F_UNLCK

    def _unlock(self) -> None:
        request = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, request)

    def close(self) -> None:
        """Close the descriptor (idempotent); this also drops its locks."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
