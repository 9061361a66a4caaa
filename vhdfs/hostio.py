"""HostIO: the one place that decides where blocking host reads run while serving requests.

A hop to a worker thread costs about 150 µs here, while a read from the host page cache costs
a few. So the default policy, ``auto``, first reads inline with ``RWF_NOWAIT``, which the
kernel answers only from the page cache, and sends only the part that would really block on
the disk to a thread. ``inline`` always reads on the trio thread (best when everything is
cached, worst on a cold disk); ``thread`` always hops (the classic approach). The policy is one
switch (``-o io=``) so benchmarks can compare them.
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum

import trio

from vhdfs.errors import HostIOError
from vhdfs.image.hostfile import HostFile


class IoMode(StrEnum):
    """Where host reads run."""

    AUTO = "auto"
    INLINE = "inline"
    THREAD = "thread"


class HostIO:
    """Reads host files for the async layers.

    Args:
        mode: The thread policy (see module docstring).
        threads: Most reads allowed in worker threads at once.
    """

    def __init__(self, mode: IoMode = IoMode.AUTO, threads: int = 8) -> None:
        self.mode = mode
        self._limiter = trio.CapacityLimiter(threads)
        self.inline_reads = 0
        self.thread_reads = 0

    async def read(self, file: HostFile, offset: int, length: int) -> bytes | bytearray:
        """Read up to ``length`` bytes at ``offset`` (short only at end of file)."""
        if self.mode == IoMode.INLINE:
            self.inline_reads += 1
            return file.pread(offset, length)
        if self.mode == IoMode.AUTO:
            buf = bytearray(length)
            got = self._read_nowait(file, buf, offset)
            if got == length:
                self.inline_reads += 1
                return buf
            rest = await self._in_thread(file, offset + got, length - got)
            buf[got : got + len(rest)] = rest
            if len(rest) < length - got:
                del buf[got + len(rest) :]
            return buf
        return await self._in_thread(file, offset, length)

    def _read_nowait(self, file: HostFile, buf: bytearray, offset: int) -> int:
        try:
            return os.preadv(file.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                # The host file system cannot tell; fall back to plain threads for good.
                self.mode = IoMode.THREAD
                return 0
            raise HostIOError(file.path, f"read at {offset} failed: {exc.strerror}") from exc

    async def _in_thread(self, file: HostFile, offset: int, length: int) -> bytes:
        self.thread_reads += 1
        return await trio.to_thread.run_sync(file.pread, offset, length, limiter=self._limiter)
