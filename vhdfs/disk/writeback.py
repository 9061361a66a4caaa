"""Write-back: acknowledged writes held in memory, and when and how they reach the image.

Dirty data waits in ``DirtyPages``. A flush moves the dirty pages aside as the *in-flight* set,
asks ``vhdfs.image.commit`` for the ordered steps that write them, executes those steps, and
drops the pages; writes arriving meanwhile go to a fresh dirty set, and reads overlay in-flight
then dirty sectors, so they always see the newest data. The order of the steps, and what a
crash leaves at each, is decided and documented in ``vhdfs.image.commit`` alone.

When data reaches the image
===========================

* At once, for a write whose sectors the leaf already holds and no older write of them waits
  (``write_in_place``; ``vhdfs.image.commit`` says why that needs no order). It is synced by
  the next ``fsync``, like flushed data.
* ``fsync``/``fdatasync`` of the raw file: everything dirty, then the host file is synced.
* ``close`` of the raw file (FUSE flush): everything dirty is written to the image file (not
  synced), so a program that closed the file has its data in the image even if the daemon is
  killed afterwards.
* The flusher task, ``interval`` seconds after the first write since the last flush.
* Sooner when dirty data passes half of ``dirty_limit``; writers wait above the whole limit.
* Unmount, SIGTERM, SIGINT and SIGHUP: everything, synced.
* Write-through (``interval`` 0): every write is flushed and synced before it is acknowledged.
* Offline (``interval`` ``None``: the image tools, which run no flusher task): a write that
  leaves more than ``dirty_limit`` dirty writes it all out itself before it returns, so a
  single write larger than the limit (a 256 MiB block copied whole) finishes too; the tool
  flushes and syncs at its end.

A failed flush keeps its data dirty and re-reads the metadata it may have changed; a failed
sync fails every later sync and write of the mount (the kernel reports lost writeback once).

Concurrency
===========

Everything runs on the trio thread. One flush at a time (``_flush_lock``); allocation happens
only inside a flush, so the end-of-file pointer needs no other lock. Metadata writes are
``pwrite`` calls on the trio thread (they land in the host page cache); long runs of data and
``fdatasync`` go to a worker thread (``HostIO``), so requests keep being served meanwhile. A
flush runs shielded from cancellation, so shutdown never interrupts one halfway (the order
makes that safe anyway). Writers that find dirty data past the limit wait for the flusher
task, never for another request, so every FUSE worker may block on it safely; offline, with no
flusher task to wait for, they flush instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from vhdfs import faults
from vhdfs.cache.block_cache import BlockCache
from vhdfs.disk.dirty import DirtyPages
from vhdfs.disk.hostio import HostIO
from vhdfs.errors import NoSpaceError, VhdfsError
from vhdfs.format.layout import SECTOR
from vhdfs.image.chain import Chain
from vhdfs.image.commit import plan_flush
from vhdfs.image.steps import (
    Allocation,
    Commit,
    CrashPoint,
    NoRoomError,
    PatchBatSector,
    Reserve,
    Step,
    Sync,
    Target,
    WriteBitmap,
    WriteData,
    WriteFooter,
)
from vhdfs.image.vhd import VhdImage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteBackStatistics:
    """Counters of the write-back layer."""

    dirty_bytes: int
    flushes: int
    host_writes: int
    syncs: int
    allocations: int
    #: Writes that went straight to the image (``write_in_place``).
    in_place_writes: int


def target_of(image: VhdImage) -> Target:
    """What the planner needs to know of ``image`` now."""
    return Target(
        kind=image.kind,
        block_size=image.block_size,
        bitmap_size=image.bitmap_size,
        table_offset=image.header.table_offset if image.header else 0,
        footer=image.footer_raw,
        file_size=image.file.size,
        next_free=image.next_free,
    )


class WriteBack:
    """Dirty data of one disk (the chain's leaf) and its ordered flushing.

    Args:
        chain: The chain whose leaf receives the writes.
        cache: The block cache, kept consistent with what is written.
        hostio: Writes long data runs and runs ``fdatasync`` away from the trio thread.
        interval: Seconds before the flusher writes dirty data; 0 means write-through; ``None``
            means offline: no flusher task runs, and writers flush past ``dirty_limit``.
        dirty_limit: Dirty bytes above which writers wait for the flusher (offline: flush).
    """

    def __init__(
        self,
        chain: Chain,
        cache: BlockCache,
        hostio: HostIO,
        *,
        interval: float | None,
        dirty_limit: int,
    ) -> None:
        self.image: VhdImage = chain.leaf
        self.cache = cache
        self.hostio = hostio
        self.interval = interval
        self.dirty_limit = dirty_limit
        self.dirty = DirtyPages()
        self.inflight: DirtyPages | None = None
        self._flush_lock = trio.Lock()
        self._dirty_event = trio.Event()
        self._pressure = trio.Event()
        self._flushed = trio.Event()
        self._unsynced = False
        self._error: VhdfsError | None = None
        self._sync_failure: VhdfsError | None = None
        self._reserved: dict[int, Allocation] = {}
        self._flushes = 0
        self._host_writes = 0
        self._syncs = 0
        self._allocations = 0
        self._in_place = 0

    @property
    def write_through(self) -> bool:
        """True when every write is flushed and synced before it is acknowledged."""
        return self.interval is not None and self.interval <= 0

    @property
    def offline(self) -> bool:
        """True when no flusher task runs: writers write out what passes the dirty limit."""
        return self.interval is None

    # -- the write side ------------------------------------------------------------------

    async def store(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Accept whole sectors of data; return when the write may be acknowledged."""
        if self._sync_failure is not None:
            raise self._sync_failure
        self.dirty.store(offset, data)
        if self.write_through:
            await self.flush(durable=True)
            return
        if self.offline:
            # Nobody else would ever flush: waiting would hang, so the writer flushes. One
            # write larger than the limit is held (a view of the caller's buffer) only until
            # this flush has written it.
            while self.dirty.size + self.inflight_size > self.dirty_limit:
                await self.flush(durable=False)
            return
        self._dirty_event.set()
        if self.dirty.size > self.dirty_limit // 2:
            # Start writing out early, so that writers rarely have to wait below.
            self._pressure.set()
        # In-flight pages count too: they are held until their flush ends.
        while self.dirty.size + self.inflight_size > self.dirty_limit:
            if self._error is not None:
                raise self._error
            flushed = self._flushed
            self._pressure.set()
            await flushed.wait()

    @property
    def inflight_size(self) -> int:
        """Bytes held by the pages of the flush under way."""
        return self.inflight.size if self.inflight is not None else 0

    def can_write_in_place(self, offset: int, length: int) -> bool:
        """True when sectors ``[offset, offset + length)`` may go straight to the image.

        That is when no older write of them waits in memory or in a flush, which would
        otherwise land after the new one. The caller has checked that the leaf holds every
        one of the sectors already (a fixed leaf, or an allocated block whose bitmap has
        them), so writing them changes no metadata and needs no order.
        """
        if self._sync_failure is not None:
            return False
        if self.dirty.overlaps(offset, length):
            return False
        return self.inflight is None or not self.inflight.overlaps(offset, length)

    async def write_in_place(self, host: int, data: memoryview) -> None:
        """Write ``data`` at ``host`` in the leaf's file (see ``can_write_in_place``).

        Acknowledged once in the host page cache, like a flushed write; the next durable
        flush syncs it. Write-through syncs it before returning.
        """
        length = await self.hostio.write(self.image.file, host, [data])
        self.cache.invalidate_data(0, host, host + length)
        self._wrote()
        self._in_place += 1
        if self.write_through:
            await self.flush(durable=True)

    def patches(self, offset: int, length: int) -> list[tuple[int, bytes]]:
        """Dirty sectors over ``[offset, offset + length)``, oldest first, for reads."""
        out = []
        if self.inflight is not None and self.inflight.pages:
            out = self.inflight.patches(offset, length)
        if self.dirty.pages:
            out += self.dirty.patches(offset, length)
        return out

    # -- flushing ------------------------------------------------------------------------

    async def run_flusher(self) -> None:
        """Background task: flush dirty data ``interval`` seconds after it appears.

        Sooner under memory pressure. Errors are logged and kept for the next fsync or writer.
        An offline write-back has no flusher task.
        """
        if self.interval is None:
            raise RuntimeError(f"{self.image.path}: an offline disk runs no flusher task")
        while True:
            await self._dirty_event.wait()
            with trio.move_on_after(self.interval):
                await self._pressure.wait()
            # Only this task replaces the pressure event, after it has woken: a writer's
            # signal can then never be left on an event nobody waits for.
            self._pressure = trio.Event()
            try:
                await self.flush(durable=False)
            except VhdfsError as exc:
                log.error("%s: write-back failed, will retry: %s", self.image.path, exc)
                await trio.sleep(1)

    async def flush(self, *, durable: bool) -> None:
        """Write every dirty sector to the image; with ``durable``, sync it too.

        Raises:
            VhdfsError: A host write or sync failed. The data stays dirty and is retried.
        """
        with trio.CancelScope(shield=True):
            async with self._flush_lock:
                await self._flush_locked(durable)

    async def _flush_locked(self, durable: bool) -> None:
        if self._sync_failure is not None:
            raise self._sync_failure
        pages = self.dirty
        if not pages.pages:
            if durable and self._unsynced:
                await self._sync()
            return
        self.dirty = DirtyPages()
        self._dirty_event = trio.Event()
        self.inflight = pages
        try:
            try:
                plan = plan_flush(
                    target_of(self.image), pages.runs(), self.cache, self._reserved, durable=durable
                )
            except NoRoomError as exc:
                raise NoSpaceError(self.image.path, str(exc)) from None
            await self._execute(plan)
            self._error = None
        except BaseException as exc:
            # Keep the data: writes that arrived since are newer and win. What the failed
            # flush changed on disk (a BAT sector, bitmaps) is re-read from the file.
            self.dirty.absorb_older(pages)
            self._dirty_event.set()
            self.cache.forget_metadata(0)
            if isinstance(exc, VhdfsError):
                self._error = exc
            raise
        finally:
            self.inflight = None
            self._flushes += 1
            self._flushed.set()
            self._flushed = trio.Event()

    async def _execute(self, plan: list[Step]) -> None:
        """Carry out ``plan`` step by step, in its order."""
        image = self.image
        for step in plan:
            match step:
                case WriteData(offset, chunks):
                    length = await self.hostio.write(image.file, offset, chunks)
                    # Dropped after the write completed: a read racing it cannot leave the
                    # old bytes cached (the write epoch moves on).
                    self.cache.invalidate_data(0, offset, offset + length)
                    self._wrote()
                case WriteBitmap(block, offset, bitmap, cached):
                    self._pwrite(offset, bitmap.raw)
                    if cached:
                        self.cache.put_bitmap(0, block, bitmap)
                case WriteFooter(offset, footer):
                    self._pwrite(offset, footer)
                case PatchBatSector(sector, patches):
                    old = image.file.pread_exact(sector * SECTOR, SECTOR, "BAT sector")
                    patched = bytearray(old)
                    for within, value in patches:
                        patched[within : within + len(value)] = value
                    self._pwrite(sector * SECTOR, patched)
                case Reserve(allocation):
                    image.next_free = max(image.next_free, allocation.end)
                    self._reserved[allocation.block] = allocation
                case Commit(allocation, bitmap):
                    self.cache.set_bat_entry(0, allocation.block, allocation.entry)
                    self.cache.put_bitmap(0, allocation.block, bitmap)
                    image.commit_allocation(allocation.end)
                    del self._reserved[allocation.block]
                    self._allocations += 1
                case Sync():
                    await self._sync()
                case CrashPoint(name):
                    faults.crash_point(name)

    async def _sync(self) -> None:
        try:
            await self.hostio.sync(self.image.file)
        except VhdfsError as exc:
            # The kernel reports a failed writeback once and may drop the pages; a later
            # fsync could then succeed over lost data. So one failure fails every later
            # sync and write of this mount.
            self._sync_failure = exc
            log.error("%s: sync failed, refusing further writes: %s", self.image.path, exc)
            raise
        self._syncs += 1
        self._unsynced = False

    def _pwrite(self, offset: int, data: bytes | bytearray) -> None:
        """Write a small piece of metadata, inline."""
        length = self.image.file.pwritev(offset, [memoryview(data)])
        self.cache.invalidate_data(0, offset, offset + length)
        self._wrote()

    def _wrote(self) -> None:
        self._host_writes += 1
        self._unsynced = True

    def statistics(self) -> WriteBackStatistics:
        """Current counters."""
        return WriteBackStatistics(
            dirty_bytes=self.dirty.size + self.inflight_size,
            flushes=self._flushes,
            host_writes=self._host_writes,
            syncs=self._syncs,
            allocations=self._allocations,
            in_place_writes=self._in_place,
        )
