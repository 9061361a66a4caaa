"""HostIO: the one place that decides where blocking host reads run while serving requests.

Three policies, chosen with ``-o io=``:

* ``inline`` (the default) reads on the trio thread. A read from the host page cache costs a
  few microseconds; one that misses it stalls other requests while the disk works.
* ``auto`` reads inline with ``RWF_NOWAIT``, which the kernel answers only from the page
  cache, and sends just the part that would block to a worker thread.
* ``thread`` always hops to a worker thread.

The default was chosen by measurement (docs/performance.md): on a virtio disk that does not
serve reads in parallel, every hop to a thread costs more than it saves, with one reader and
with four. Storage that does (NVMe, network file systems) is where ``auto`` pays off.

Worker threads are our own rather than ``trio.to_thread``: a hop to a resident thread that
reports back with ``TrioToken.run_sync_soon`` measured a third of the cost of
``trio.to_thread.run_sync``. Threads start on first use, so never before the daemon forks.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import trio

from vhdfs.errors import HostIOError
from vhdfs.image.hostfile import HostFile

#: Host writes at least this long go to a worker thread (see ``HostIO.write``).
THREAD_WRITE_MIN = 256 << 10


class IoMode(StrEnum):
    """Where host reads run."""

    AUTO = "auto"
    INLINE = "inline"
    THREAD = "thread"


class _Call:
    """One function call handed to a worker thread, and its outcome."""

    __slots__ = ("args", "done", "error", "function", "result")

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class WorkerPool:
    """Resident threads that run blocking calls for the trio thread.

    Args:
        threads: Number of worker threads (started on first use).
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._started: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` in a worker thread and return its result (or raise)."""
        if not self._started:
            self._token = trio.lowlevel.current_trio_token()
            for number in range(self._threads):
                thread = threading.Thread(target=self._work, name=f"vhdfs-io-{number}", daemon=True)
                thread.start()
                self._started.append(thread)
        call = _Call(function, args)
        self._queue.put(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _work(self) -> None:
        assert self._token is not None
        while (call := self._queue.get()) is not None:
            try:
                call.result = call.function(*call.args)
            except BaseException as exc:  # handed to the waiting task
                call.error = exc
            self._token.run_sync_soon(call.done.set)
            # Let go of the call (a long write's buffers) now: the name would otherwise keep
            # it alive while this thread waits for its next call, however long that is.
            del call

    def close(self) -> None:
        """Stop the threads once the queued calls are done."""
        for _ in self._started:
            self._queue.put(None)
        for thread in self._started:
            thread.join()
        self._started.clear()


class HostIO:
    """Blocking host I/O for the async layers: reads, long writes and syncs.

    Args:
        mode: The thread policy for reads (see module docstring).
        threads: Worker threads for reads that would block, long writes and syncs.
    """

    def __init__(self, mode: IoMode = IoMode.INLINE, threads: int = 4) -> None:
        self.mode = mode
        self._pool = WorkerPool(threads)
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
            raise HostIOError(
                file.path, f"read at {offset} failed: {exc.strerror}", exc.errno
            ) from exc

    async def _in_thread(self, file: HostFile, offset: int, length: int) -> bytes:
        self.thread_reads += 1
        data: bytes = await self._pool.run(file.pread, offset, length)
        return data

    async def write(self, file: HostFile, offset: int, chunks: list[memoryview]) -> int:
        """Write ``chunks`` one after the other from ``offset``; return the bytes written.

        Runs of at least ``THREAD_WRITE_MIN`` bytes are written by a worker thread, so the trio
        thread keeps taking requests meanwhile (the copy into the host page cache releases
        the GIL); shorter ones inline, where a thread hop would cost more than the write.
        """
        if sum(len(chunk) for chunk in chunks) >= THREAD_WRITE_MIN:
            written: int = await self._pool.run(file.pwritev, offset, chunks)
            return written
        return file.pwritev(offset, chunks)

    async def sync(self, file: HostFile) -> None:
        """``fdatasync`` the file in a worker thread (it can take long)."""
        await self._pool.run(file.fdatasync)

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.close()
