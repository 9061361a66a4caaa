"""Interleavings the trio scheduler allows between a read waiting on the disk and a flush."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.support.images import Layer, build_chain, pattern
from vhdfs.cache.block_cache import BlockCache
from vhdfs.cache.writeback import WriteBack
from vhdfs.disk import VirtualDisk
from vhdfs.hostio import HostIO, IoMode
from vhdfs.image.chain import Chain
from vhdfs.image.hostfile import HostFile


class SlowDisk(HostIO):
    """Reads take their bytes at once, then wait for ``done`` as a slow disk would."""

    def __init__(self) -> None:
        super().__init__(IoMode.THREAD)
        self.done = trio.Event()
        self.started = trio.Event()

    async def read(self, file: HostFile, offset: int, length: int) -> bytes:
        data = file.pread(offset, length)
        self.started.set()
        await self.done.wait()
        return data


async def test_read_racing_a_flush_never_caches_old_bytes(tmp_path: Path) -> None:
    built = build_chain(tmp_path, 4 << 20, [Layer(writes=[(0, 64)])])
    chain = Chain.open(str(built.leaf), writable=True)
    cache = BlockCache(chain)
    hostio = SlowDisk()
    disk = VirtualDisk(chain, cache, hostio, WriteBack(chain, cache, hostio, interval=60))
    new = pattern(5, 4096)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disk.read, 0, 4096)  # reads the old bytes, then waits
            await hostio.started.wait()
            await disk.write(0, new)
            await disk.flush(durable=False)  # the new bytes are in the file now
            hostio.done.set()  # the slow read finishes with the old bytes it took
        assert bytes(await disk.read(0, 4096)) == new
    finally:
        await disk.aclose()
