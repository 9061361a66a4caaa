"""The ceiling of the stack: a pyfuse3 file system on trio that serves one file of zeros.

It answers reads from memory with the same mount options vhdfs uses, so the gap between it and
vhdfs is what the image layer costs, and the gap between it and a C daemon is what pyfuse3,
trio and Python cost.

    python benchmarks/zerofs.py SIZE MOUNTPOINT [--pread FILE OFFSET]

Foreground; stop it with SIGTERM. With ``--pread`` it answers each read with one ``os.pread``
of FILE at OFFSET plus the request's offset instead (for a fixed-layout stretch of an image
file that holds the data: the cost of the host read alone, with no mapping at all).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

ZEROS = memoryview(bytes(1 << 20))


class ZeroFS(pyfuse3.Operations):
    def __init__(self, size: int, fd: int | None, base: int) -> None:
        super().__init__()
        self.size = size
        self.fd = fd
        self.base = base

    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_size = self.size
        attr.st_blksize = 4096
        attr.entry_timeout = attr.attr_timeout = 3600
        return attr

    async def open(self, inode, flags, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        size = max(0, min(size, self.size - off))
        if self.fd is not None:
            return os.pread(self.fd, size, self.base + off)
        return ZEROS[:size] if size <= len(ZEROS) else bytes(size)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


async def serve() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                async for _ in signals:
                    pyfuse3.terminate()

            nursery.start_soon(stop)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


def main() -> None:
    size, mountpoint = int(sys.argv[1]), sys.argv[2]
    fd, base = None, 0
    if sys.argv[3:4] == ["--pread"]:
        fd, base = os.open(sys.argv[4], os.O_RDONLY), int(sys.argv[5])
    options = set(pyfuse3.default_options) | {"ro", "fsname=zerofs", "subtype=zerofs"}
    pyfuse3.init(ZeroFS(size, fd, base), mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    os._exit(0)


if __name__ == "__main__":
    main()
