"""Interleavings the trio scheduler allows between a read waiting on the disk and a flush."""

from __future__ import annotations

import errno
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.support.images import Layer, build_chain, pattern
from vhdfs.cache.block_cache import MIN_CACHE_SIZE
from vhdfs.disk.hostio import HostIO, IoMode
from vhdfs.disk.virtual import DiskOptions, open_disk
from vhdfs.errors import HostIOError
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
    hostio = SlowDisk()
    disk = open_disk(str(built.leaf), DiskOptions(writeback=60), hostio=hostio)
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


class SlowSync(HostIO):
    """Syncs wait for ``release`` (a slow disk flushing its cache); reads are immediate."""

    def __init__(self) -> None:
        super().__init__(IoMode.INLINE)
        self.release = trio.Event()
        self.syncing = trio.Event()

    async def sync(self, file: HostFile) -> None:
        self.syncing.set()
        await self.release.wait()
        file.fdatasync()


async def test_bitmap_reloaded_during_the_sync_gets_the_new_bits(tmp_path: Path) -> None:
    # Block 0 holds sectors 0-7; blocks 1-3 are full, so reading them can evict block 0's
    # bitmap from a 1 MiB cache while the flush waits for its sync.
    layer = Layer(block_size=512 << 10, writes=[(0, 8), (1024, 3072)])
    built = build_chain(tmp_path, 4 << 20, [layer])
    hostio = SlowSync()
    options = DiskOptions(writeback=60, cache_size=MIN_CACHE_SIZE)
    disk = open_disk(str(built.leaf), options, hostio=hostio)
    new = pattern(8, 512)
    try:
        await disk.write(8 * 512, new)  # sector 8: its bit is still clear
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(disk.flush, durable=True))
            await hostio.syncing.wait()
            for offset in range(512 << 10, 2 << 20, 16 << 10):
                await disk.read(offset, 4096)  # evicts the bitmap
            await disk.read(0, 4096)  # reloads it from the file: the old bits
            hostio.release.set()
        assert bytes(await disk.read(8 * 512, 512)) == new
    finally:
        await disk.aclose()
    check = open_disk(str(built.leaf), DiskOptions(read_only=True))
    try:
        assert bytes(await check.read(8 * 512, 512)) == new
    finally:
        await check.aclose()


class FailingSync(HostIO):
    """The first sync fails as a disk error would; later ones would succeed."""

    def __init__(self) -> None:
        super().__init__(IoMode.INLINE)
        self.failed = False

    async def sync(self, file: HostFile) -> None:
        if not self.failed:
            self.failed = True
            raise HostIOError(file.path, "fdatasync failed: Input/output error", errno.EIO)
        file.fdatasync()


async def test_a_failed_sync_fails_every_later_sync_and_write(tmp_path: Path) -> None:
    built = build_chain(tmp_path, 4 << 20, [Layer(kind="fixed")])
    disk = open_disk(str(built.leaf), DiskOptions(writeback=60), hostio=FailingSync())
    await disk.write(0, pattern(1, 4096))
    for _ in range(2):
        with pytest.raises(HostIOError, match="fdatasync failed"):
            await disk.flush(durable=True)
    with pytest.raises(HostIOError, match="fdatasync failed"):
        await disk.write(4096, pattern(2, 4096))
    disk.hostio.close()
    disk.chain.close()


async def test_writes_in_place_never_pass_an_older_write_of_the_same_sectors(
    tmp_path: Path,
) -> None:
    # Block 0 holds sectors 0-7. X goes to sectors 16-23 (bits clear: staged). Its flush sets
    # the bits, then waits in the sync before writing X's data; Y, written meanwhile, finds
    # the sectors present but X still in flight, and W, written after, finds Y still dirty.
    # Had either gone in place, the older data written after it would win.
    built = build_chain(tmp_path, 4 << 20, [Layer(block_size=512 << 10, writes=[(0, 8)])])
    hostio = SlowSync()
    disk = open_disk(str(built.leaf), DiskOptions(writeback=60), hostio=hostio)
    x, y, w = pattern(1, 4096), pattern(2, 4096), pattern(3, 4096)
    try:
        assert disk.writeback is not None
        await disk.write(8192, x)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(disk.flush, durable=False))
            await hostio.syncing.wait()
            assert disk.cache.direct(8192, 4096).layer == 0  # type: ignore[union-attr]
            await disk.write(8192, y)
            hostio.release.set()
        await disk.write(8192, w)
        assert disk.writeback.statistics().in_place_writes == 0
        assert bytes(await disk.read(8192, 4096)) == w
        await disk.flush(durable=True)
        assert bytes(await disk.read(8192, 4096)) == w
        await disk.write(8192, x)  # nothing older waits now: in place
        assert disk.writeback.statistics().in_place_writes == 1
    finally:
        await disk.aclose()
    check = open_disk(str(built.leaf), DiskOptions(read_only=True))
    try:
        assert bytes(await check.read(8192, 4096)) == x
    finally:
        await check.aclose()
