"""VirtualDisk: the raw disk of one chain, as async read, write and flush calls.

A read has three steps. Planning is synchronous: the chain maps the range to extents, pulling
any metadata it lacks through the block cache, and the dirty sectors over the range are taken
from the write-back layer, all with no checkpoint in between, so the plan and the dirty data
describe one consistent state. Zeros and cached data are answered at once. What remains is one
host read per contiguous allocated run, done through HostIO. The dirty sectors go on top.

Writes are whole sectors by the time they reach the write-back layer: the partial sectors at
either end of a request are first completed with what the disk holds there now (for a
differencing disk that is the parent's data: the "copy up" the bitmap's sector granularity
requires).
The raw file behaves like a block device: its size is fixed, a write starting at or past the
end fails with ENOSPC and one crossing the end is cut short.

``open_disk`` is the one way to build a disk: the daemon, the tools and the tests use it
alike, and ``DiskOptions`` holds every default (``vhdfs --help`` imports them from here only
to show them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import trio

from vhdfs.cache.block_cache import BlockCache, DataRead
from vhdfs.cache.lru import CacheStatistics
from vhdfs.disk.hostio import HostIO, IoMode
from vhdfs.disk.writeback import WriteBack, WriteBackStatistics
from vhdfs.errors import HostIOError, ImageError, NoSpaceError, ReadOnlyError
from vhdfs.format.layout import SECTOR
from vhdfs.image.bounded import LOOKUP_TIME_LIMIT, bounded
from vhdfs.image.chain import Chain
from vhdfs.image.extents import Extent

_ZERO_BLOCK = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZERO_BLOCK)

Buffer = bytes | bytearray | memoryview

#: Default ``cache_size`` (``-o cache_size=``): memory for cached metadata and data.
DEFAULT_CACHE_SIZE = 64 << 20
#: Default ``writeback`` (``-o writeback=``): seconds dirty data may wait before the flusher
#: writes it.
DEFAULT_WRITEBACK = 5.0
#: Default ``dirty_limit`` (``-o dirty_limit=``): dirty bytes above which writers wait for the
#: flusher (offline: write them out).
DEFAULT_DIRTY_LIMIT = 64 << 20


@dataclass(frozen=True, slots=True)
class DiskStatistics:
    """Counters of one disk, for SIGUSR1 and the benchmark scripts."""

    reads: int
    bytes_read: int
    host_reads: int
    #: Host reads answered on the trio thread and by worker threads (see ``-o io=``).
    inline_reads: int
    thread_reads: int
    writes: int
    bytes_written: int
    cache: CacheStatistics
    writeback: WriteBackStatistics | None


@dataclass
class DiskOptions:
    """How to open a disk (the ``-o`` options that concern one image, or a tool's needs)."""

    read_only: bool = False
    #: ``rw`` was asked for explicitly: refuse rather than fall back to read-only.
    explicit_rw: bool = False
    #: Opened by a tool, not served: no flusher task runs, so ``writeback`` does not apply and
    #: a write that leaves more than ``dirty_limit`` dirty writes it out before returning. Data
    #: reaches the image as the tool goes, whatever the block size; ``flush`` or ``aclose``
    #: writes the rest and syncs.
    offline: bool = False
    cache_size: int = DEFAULT_CACHE_SIZE
    #: Seconds written data may wait in memory; 0 writes through.
    writeback: float = DEFAULT_WRITEBACK
    dirty_limit: int = DEFAULT_DIRTY_LIMIT
    io_mode: IoMode = IoMode.INLINE
    #: ``parents=DIR``: open only parents whose real path lies inside this folder.
    parents: str | None = None
    #: Seconds that finding and opening one image file may take (a stalled mount).
    time_limit: float = LOOKUP_TIME_LIMIT


class VirtualDisk:
    """The guest-visible disk of ``chain``.

    Args:
        chain: The opened images.
        cache: Cache over the chain's layers.
        hostio: Where host reads (and syncs) run.
        writeback: The write-back layer of a writable disk; ``None`` makes it read-only.
    """

    def __init__(
        self,
        chain: Chain,
        cache: BlockCache,
        hostio: HostIO,
        writeback: WriteBack | None = None,
    ) -> None:
        self.chain = chain
        self.cache = cache
        self.hostio = hostio
        self.writeback = writeback
        self.size = chain.virtual_size
        self.read_only = writeback is None
        #: Problems that did not stop the disk from opening, one line each, with the file.
        self.warnings: list[str] = [
            f"{layer.path}: {notice}" for layer in chain.layers for notice in layer.warnings
        ]
        self._write_lock = trio.Lock()
        self._reads = 0
        self._bytes_read = 0
        self._host_reads = 0
        self._writes = 0
        self._bytes_written = 0

    # -- reading -------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> Buffer:
        """Up to ``length`` bytes at ``offset``; shorter only at the end of the disk."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        direct = self._read_direct(offset, length)
        if direct is not None:
            return direct
        plan = self.chain.plan_read(offset, length, self.cache)
        patches = self.writeback.patches(offset, length) if self.writeback else []
        self._reads += 1
        parts: list[Buffer] = []
        for _start, count, layer, host in plan:
            if layer is None:
                parts.append(_ZERO_VIEW[:count] if count <= len(_ZERO_BLOCK) else bytes(count))
            else:
                parts.append(await self._read_layer(layer, host, count))
        self._bytes_read += length
        if patches:
            merged = bytearray().join(parts)
            for start, data in patches:
                merged[start - offset : start - offset + len(data)] = data
            return merged
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _read_direct(self, offset: int, length: int) -> Buffer | None:
        """The commonest read, answered from the direct map and ``pread``, or ``None``.

        That is a read inside one leaf block (``BlockCache.map_read``: one extent when one
        layer holds it whole, a few in a chain), with nothing written and not yet in the image,
        host reads inline: no await, so nothing can change between the lookup and the reads.
        The data cache is passed by: a page-cache read costs about what a hit does, and
        caching would cost a copy (docs/performance.md).
        """
        writeback = self.writeback
        if writeback is not None and (writeback.dirty.pages or writeback.inflight is not None):
            return None
        if self.hostio.mode is not IoMode.INLINE:
            return None
        cache = self.cache
        extents = cache.map_read(offset, length)
        if extents is None:
            extent = cache.direct(offset, length)  # a fixed leaf, or one layer by luck
            if extent is None:
                return None
            extents = [extent]
        self._reads += 1
        self._bytes_read += length
        if len(extents) == 1:
            return self._pread(extents[0])
        return b"".join([self._pread(extent) for extent in extents])

    def _pread(self, extent: Extent) -> Buffer:
        length = extent.length
        if extent.layer is None:
            return _ZERO_VIEW[:length] if length <= len(_ZERO_BLOCK) else bytes(length)
        file = self.chain.layers[extent.layer].file
        data = file.pread(extent.host, length)
        self._host_reads += 1
        if len(data) != length:
            raise HostIOError(
                file.path,
                f"file ended early: read at {extent.host} returned {len(data)} of {length} bytes",
            )
        return data

    async def _read_layer(self, layer: int, offset: int, length: int) -> Buffer:
        found = self.cache.lookup(layer, offset, length)
        if not isinstance(found, DataRead):
            return found
        file = self.chain.layers[layer].file
        raw = await self.hostio.read(file, found.start, found.stop - found.start)
        self._host_reads += 1
        return self.cache.fill(found, raw)

    # -- writing -------------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at ``offset``; return how many bytes were written.

        Raises:
            ReadOnlyError: The disk is read-only.
            NoSpaceError: ``offset`` is at or past the end of the disk.
        """
        if self.writeback is None:
            raise ReadOnlyError(self.chain.leaf.path, "the disk is mounted read-only")
        if not data:
            return 0
        if offset >= self.size:
            raise NoSpaceError(
                self.chain.leaf.path, f"write at {offset} is past the end of the disk"
            )
        view = memoryview(data)[: self.size - offset]
        end = offset + len(view)
        head = offset % SECTOR
        tail = -end % SECTOR
        if head or tail or self._write_lock.locked():
            # A partial sector is completed with what the disk holds now, over an await:
            # no other write may store in between, or the completed sector would undo it.
            async with self._write_lock:
                if head or tail:
                    start, stop = offset - head, end + tail
                    sectors = bytearray(stop - start)
                    if head:
                        sectors[:SECTOR] = await self.read(start, SECTOR)
                    if tail and (stop - SECTOR >= start + SECTOR or not head):
                        sectors[-SECTOR:] = await self.read(stop - SECTOR, SECTOR)
                    sectors[head : head + len(view)] = view
                    await self._write_sectors(start, memoryview(sectors))
                else:
                    await self._write_sectors(offset, view)
        else:
            await self._write_sectors(offset, view)
        self._writes += 1
        self._bytes_written += len(view)
        return len(view)

    async def _write_sectors(self, offset: int, view: memoryview) -> None:
        """Write whole sectors: in place when the leaf holds them all already, else staged.

        In place needs no order with anything (no metadata changes) as long as no older
        write of the same sectors is still waiting (``WriteBack.can_write_in_place``).
        """
        assert self.writeback is not None
        extent = self.cache.direct(offset, len(view))
        if (
            extent is not None
            and extent.layer == 0
            and self.writeback.can_write_in_place(offset, len(view))
        ):
            await self.writeback.write_in_place(extent.host, view)
        else:
            await self.writeback.store(offset, view)

    @property
    def write_generation(self) -> int:
        """A number that changes whenever the disk is written (for views derived from it)."""
        return self._writes

    def write_through(self) -> None:
        """From now on, acknowledge a write only once it is in the image and synced."""
        if self.writeback is not None:
            self.writeback.interval = 0

    async def flush(self, *, durable: bool) -> None:
        """Write dirty data to the image; with ``durable``, also sync the image file."""
        if self.writeback is not None:
            await self.writeback.flush(durable=durable)

    def allocated_bytes(self) -> int:
        """What the disk holds data for (``st_blocks``), never more than the disk.

        The chain's allocation plus data written but not yet in the image: never 0 once
        anything was written, so that archivers do not take a fresh disk for one big hole.
        """
        waiting = self.writeback.statistics().dirty_bytes if self.writeback is not None else 0
        return min(self.size, self.chain.allocated_bytes() + waiting)

    def statistics(self) -> DiskStatistics:
        """Current counters."""
        return DiskStatistics(
            reads=self._reads,
            bytes_read=self._bytes_read,
            host_reads=self._host_reads,
            inline_reads=self.hostio.inline_reads,
            thread_reads=self.hostio.thread_reads,
            writes=self._writes,
            bytes_written=self._bytes_written,
            cache=self.cache.statistics(),
            writeback=self.writeback.statistics() if self.writeback else None,
        )

    async def aclose(self) -> None:
        """Write everything out durably, stop the I/O threads and release the images."""
        try:
            await self.flush(durable=True)
        finally:
            self.hostio.close()
            self.chain.close()


def open_disk(
    path: str, options: DiskOptions | None = None, *, hostio: HostIO | None = None
) -> VirtualDisk:
    """Open the image at ``path`` (and its parents) as a disk.

    Read-write unless ``options.read_only``. A default (implicit ``rw``) open falls back to
    read-only, with a warning in ``disk.warnings``, for an image the user cannot write or one
    that is unsafe to write; an explicit ``rw`` refuses instead. ``hostio`` replaces the
    host I/O policy of ``options.io_mode`` (the race tests slow it down on purpose).

    Raises:
        VhdfsError: The image, its chain or its lock.
    """
    options = options or DiskOptions()
    writable = not options.read_only
    fallback: list[str] = []
    if writable and not bounded(partial(_may_write, path), path=path, limit=options.time_limit):
        fallback.append(_cannot_write(path, options, "you cannot write to it"))
        writable = False
    chain = Chain.open(
        path, writable=writable, parents=options.parents, time_limit=options.time_limit
    )
    if writable and (problem := chain.leaf.write_problem()) is not None:
        chain.close()
        fallback.append(_cannot_write(path, options, problem.message))
        writable = False
        chain = Chain.open(
            path, writable=False, parents=options.parents, time_limit=options.time_limit
        )
    cache = BlockCache(chain, options.cache_size)
    hostio = hostio or HostIO(options.io_mode)
    writeback = None
    if writable:
        interval = None if options.offline else options.writeback
        writeback = WriteBack(
            chain, cache, hostio, interval=interval, dirty_limit=options.dirty_limit
        )
    disk = VirtualDisk(chain, cache, hostio, writeback)
    disk.warnings[:0] = fallback
    return disk


def _may_write(path: str) -> bool:
    """False for an existing image the user cannot write (a missing one is Chain's to name)."""
    return not os.path.exists(path) or os.access(path, os.W_OK)


def _cannot_write(path: str, options: DiskOptions, reason: str) -> str:
    if options.explicit_rw:
        raise ImageError(path, f"cannot mount read-write: {reason} (mount it with -o ro)")
    return f"{path}: {reason}; mounting it read-only"
