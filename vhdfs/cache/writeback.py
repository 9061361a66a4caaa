"""Write-back: acknowledged writes held in memory, and the ordered way they reach the image.

Dirty data
==========

Writes land in ``DirtyPages``: whole sectors of the virtual disk, in 4 KiB pages, each with a
mask of the sectors it holds (partial sectors are completed by the caller with the current
contents first, so a page never holds half a sector). Reads take the dirty sectors over
whatever the image says. A flush moves the dirty pages aside as the *in-flight* set, writes
them out, and drops them; writes arriving meanwhile go to a fresh dirty set, and reads
overlay in-flight then dirty sectors, so they always see the newest data.

When data reaches the image
===========================

* ``fsync``/``fdatasync`` of the raw file: everything dirty, then the host file is synced.
* ``close`` of the raw file (FUSE flush): everything dirty is written to the image file (not
  synced), so a program that closed the file has its data in the image even if the daemon is
  killed afterwards.
* The flusher task, ``interval`` seconds after the first write since the last flush.
* Sooner when dirty data passes ``dirty_limit``: writers then wait for the flusher.
* Unmount, SIGTERM, SIGINT and SIGHUP: everything, synced.
* Write-through (``interval`` 0): every write is flushed and synced before it is acknowledged.

Write order of one flush (dynamic and differencing images)
==========================================================

The footer copy at offset 0 and the dynamic header never change. Readers may rely on every
sector whose bit is clear holding zeros on disk (QEMU ignores bitmaps and reads them), so that
stays true at every instant. For each dirty block:

A. Block already allocated, sectors already present: write the data sectors into it.
A'. Block already allocated, sectors gaining their bit:

   * dynamic image: write the bitmap with the new bits now and the data after step 3. A
     clear bit meant zeros, and the sectors hold zeros until their data lands, so the disk
     reads the old contents or the new, never anything else, in every reader;
   * differencing image: write the data now and the bitmap in step 4. A clear bit means "the
     parent's sector": a bit set over unwritten data would hide it.

B. Block not allocated (for a dynamic image, only if the data is not all zeros; all-zero writes
   to an unallocated block allocate nothing):
   1. write the footer, unchanged, at the new end of file E (the old trailing footer is still
      intact until now, so the last 512 bytes of the file are always a valid footer);
   2. write the block's bitmap with bits for exactly the sectors being written, and those
      sectors' data. The block lies past the old end of file, so its unwritten sectors are a
      hole and read as zeros. The old footer is left where it is, in the alignment gap
      before the bitmap; in the rare layout where the bitmap covers it, the new footer is
      synced first, so a power cut cannot leave the file without a valid trailing footer.

Then, once for the whole flush:

3. ``fdatasync`` the image, if any bitmap or BAT update follows or was made in A' (or the
   flush must be durable); then write the data of A' (dynamic).
4. Write the bitmap sectors of differencing blocks that gained bits (their data is durable).
5. Write each BAT sector that gains entries, read from the file and patched, as a whole 512-byte
   sector (never a 4-byte write that a torn write could spread to neighbours).
6. ``fdatasync`` again if the flush must be durable.

What a crash (kill -9, power loss) can leave behind, at each point (the names are the crash
points of ``vhdfs.faults`` that the crash tests stop the daemon at):

===============================  ==============================================================
crash after                      state of the image on disk
===============================  ==============================================================
A ``flush-data-written``         valid; the new data may or may not be there (never synced)
B1 ``alloc-footer-written``      valid: a trailing footer at the end; the space before it is
                                 leaked (within the same mount a retry of the block reuses it)
B2 ``alloc-block-written``       valid: the BAT does not reference the block yet; space leaked
3 ``flush-data-synced``          valid; the data is durable but not yet referenced (leaked, or
                                 bits clear: those sectors still read as before); for A' the
                                 bits are durable over zeros, which still read as before
4 ``flush-bitmaps-written``      valid; the new bits point at synced data
5 ``flush-bat-written``          valid; each BAT entry points at a fully written, synced block
6 (synced)                       valid and durable: everything acknowledged by fsync is there
===============================  ==============================================================

Fixed images have no metadata: data is written in place and synced when durability is asked.

A failed flush keeps its data dirty and re-reads the metadata it may have changed; a failed
sync fails every later sync and write of the mount (the kernel reports lost writeback once).

Concurrency
===========

Everything runs on the trio thread. One flush at a time (``_flush_lock``); allocation happens
only inside a flush, so the end-of-file pointer needs no other lock. Metadata writes are
``pwrite`` calls on the trio thread (they land in the host page cache); long runs of data and
``fdatasync`` go to a worker thread, so requests keep being served meanwhile (measured: 1 MiB
writes plus fsync through FUSE, 160 -> 250 MiB/s). A flush runs shielded from cancellation, so
shutdown never interrupts one halfway (the ordering makes that safe anyway). The flusher starts
once dirty data passes half the limit; writers that find it past the whole limit wait for the
flusher task, never for another request, so every FUSE worker may block on it safely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from vhdfs import faults
from vhdfs.cache.block_cache import BlockCache
from vhdfs.errors import VhdfsError
from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import FOOTER_SIZE, SECTOR, UNALLOCATED, DiskType
from vhdfs.hostio import HostIO
from vhdfs.image.chain import Chain
from vhdfs.image.vhd import Allocation, VhdImage

log = logging.getLogger(__name__)

PAGE = 4096
_SECTORS_PER_PAGE = PAGE // SECTOR
_FULL_MASK = (1 << _SECTORS_PER_PAGE) - 1

#: Default ``-o writeback=``: seconds dirty data may wait before the flusher writes it.
DEFAULT_INTERVAL = 5.0
#: Default ``-o dirty_limit=``: dirty bytes above which writers wait for the flusher.
DEFAULT_DIRTY_LIMIT = 64 << 20


def _mask_runs(mask: int) -> tuple[tuple[int, int], ...]:
    runs = []
    sector = 0
    while sector < _SECTORS_PER_PAGE:
        if mask >> sector & 1:
            start = sector
            while sector < _SECTORS_PER_PAGE and mask >> sector & 1:
                sector += 1
            runs.append((start, sector - start))
        else:
            sector += 1
    return tuple(runs)


#: Runs of set sectors, ``(first, count)``, for every possible page mask.
_RUNS = tuple(_mask_runs(mask) for mask in range(1 << _SECTORS_PER_PAGE))


_ZERO_PAGE = memoryview(bytes(PAGE))

#: A run of dirty data as the buffers it is made of (views of the pages, never copied).
Chunks = list[memoryview]


class _Page:
    """One dirty page.

    A page written whole is a view into the buffer the write arrived in (no copy: a 1 MiB
    write becomes 256 views of one buffer); ``owner`` is that buffer. A partly written page
    is a zero-filled bytearray of its own. ``mask`` has a bit per sector held.
    """

    __slots__ = ("data", "mask", "owner")

    def __init__(self, data: memoryview | bytearray, mask: int, owner: object = None) -> None:
        self.data = data
        self.mask = mask
        self.owner = owner


class DirtyPages:
    """Dirty sectors of one disk, in 4 KiB pages keyed by page number.

    ``size`` is the memory really held: every buffer some page still views, counted once
    however many pages view it, plus the pages of their own. So a page overwritten later
    frees nothing until the rest of its buffer is gone too, and ``size`` says so.
    """

    def __init__(self) -> None:
        self.pages: dict[int, _Page] = {}
        self._owners: dict[int, list[object]] = {}  # id -> [buffer, pages viewing it]
        self.size = 0

    def _hold(self, page_no: int, page: _Page) -> None:
        old = self.pages.get(page_no)
        if old is not None:
            self._release(old)
        self.pages[page_no] = page
        if page.owner is None:
            self.size += PAGE
            return
        entry = self._owners.get(id(page.owner))
        if entry is None:
            self._owners[id(page.owner)] = [page.owner, 1]
            self.size += len(page.owner)  # type: ignore[arg-type]
        else:
            entry[1] += 1  # type: ignore[operator]

    def _release(self, page: _Page) -> None:
        if page.owner is None:
            self.size -= PAGE
            return
        entry = self._owners[id(page.owner)]
        entry[1] -= 1  # type: ignore[operator]
        if entry[1] == 0:
            del self._owners[id(page.owner)]
            self.size -= len(page.owner)  # type: ignore[arg-type]

    def store(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` (whole sectors at a sector-aligned ``offset``) as dirty.

        The caller hands ``data`` over: it must not change it afterwards (pyfuse3 passes each
        write as a fresh ``bytes`` object, which nothing else holds).
        """
        view = memoryview(data)
        pages = self.pages
        pos = 0
        while pos < len(view):
            page_no, within = divmod(offset + pos, PAGE)
            count = min(PAGE - within, len(view) - pos)
            if count == PAGE:
                self._hold(page_no, _Page(view[pos : pos + PAGE], _FULL_MASK, data))
            else:
                page = pages.get(page_no)
                if page is None or page.owner is not None:
                    own = _Page(bytearray(PAGE) if page is None else bytearray(page.data), 0)
                    own.mask = 0 if page is None else page.mask
                    self._hold(page_no, own)
                    page = own
                page.data[within : within + count] = view[pos : pos + count]
                page.mask |= ((1 << (count // SECTOR)) - 1) << (within // SECTOR)
            pos += count

    def patches(self, offset: int, length: int) -> list[tuple[int, bytes]]:
        """Dirty sectors within ``[offset, offset + length)``, as ``(disk offset, bytes)``."""
        out = []
        end = offset + length
        pages = self.pages
        for page_no in range(offset // PAGE, (end - 1) // PAGE + 1):
            page = pages.get(page_no)
            if page is None:
                continue
            base = page_no * PAGE
            for first, count in _RUNS[page.mask]:
                start = max(base + first * SECTOR, offset)
                stop = min(base + (first + count) * SECTOR, end)
                if start < stop:
                    out.append((start, bytes(page.data[start - base : stop - base])))
        return out

    def runs(self) -> Iterator[tuple[int, Chunks]]:
        """Every dirty run of consecutive sectors, in disk order, as ``(offset, chunks)``."""
        run_start = -1
        run_end = -1
        parts: Chunks = []
        for page_no in sorted(self.pages):
            page = self.pages[page_no]
            base = page_no * PAGE
            view = memoryview(page.data)
            for first, count in _RUNS[page.mask]:
                start = base + first * SECTOR
                if start != run_end:
                    if parts:
                        yield run_start, parts
                    run_start, parts = start, []
                parts.append(view[first * SECTOR : (first + count) * SECTOR])
                run_end = start + count * SECTOR
        if parts:
            yield run_start, parts

    def absorb_older(self, older: DirtyPages) -> None:
        """Add the sectors of ``older`` that this set does not hold (after a failed flush)."""
        for page_no, old in older.pages.items():
            page = self.pages.get(page_no)
            if page is None:
                self._hold(page_no, old)
                continue
            missing = old.mask & ~page.mask & _FULL_MASK
            if not missing:
                continue
            if page.owner is not None:
                own = _Page(bytearray(page.data), page.mask)
                self._hold(page_no, own)
                page = own
            assert isinstance(page.data, bytearray)
            for first, count in _RUNS[missing]:
                a, b = first * SECTOR, (first + count) * SECTOR
                page.data[a:b] = old.data[a:b]
            page.mask |= old.mask


@dataclass(frozen=True, slots=True)
class WriteBackStatistics:
    """Counters of the write-back layer."""

    dirty_bytes: int
    flushes: int
    host_writes: int
    syncs: int
    allocations: int


class WriteBack:
    """Dirty data of one disk (the chain's leaf) and its ordered flushing.

    Args:
        chain: The chain whose leaf receives the writes.
        cache: The block cache, kept consistent with what is written.
        hostio: Writes long data runs and runs ``fdatasync`` away from the trio thread.
        interval: Seconds before the flusher writes dirty data; 0 means write-through.
        dirty_limit: Dirty bytes above which writers wait for the flusher.
    """

    def __init__(
        self,
        chain: Chain,
        cache: BlockCache,
        hostio: HostIO,
        *,
        interval: float = DEFAULT_INTERVAL,
        dirty_limit: int = DEFAULT_DIRTY_LIMIT,
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

    @property
    def write_through(self) -> bool:
        """True when every write is flushed and synced before it is acknowledged."""
        return self.interval <= 0

    # -- the write side ------------------------------------------------------------------

    async def store(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Accept whole sectors of data; return when the write may be acknowledged."""
        if self._sync_failure is not None:
            raise self._sync_failure
        self.dirty.store(offset, data)
        if self.write_through:
            await self.flush(durable=True)
            return
        self._dirty_event.set()
        if self.dirty.size > self.dirty_limit // 2:
            # Start writing out early, so that writers rarely have to wait below.
            self._pressure.set()
        while self.dirty.size > self.dirty_limit:
            if self._error is not None:
                raise self._error
            flushed = self._flushed
            self._pressure.set()
            await flushed.wait()

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
        """
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
            if self.image.kind == DiskType.FIXED:
                await self._write_fixed(pages, durable)
            else:
                await self._write_sparse(pages, durable)
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
        self._host_writes += 1

    async def _write_data(self, offset: int, chunks: Chunks) -> None:
        """Write a run of guest data (large runs in a worker thread, see HostIO.write).

        Cached chunks are dropped after the write has completed, so a read racing it cannot
        leave the old bytes cached (the write epoch moves on).
        """
        length = await self.hostio.write(self.image.file, offset, chunks)
        self.cache.invalidate_data(0, offset, offset + length)
        self._host_writes += 1

    async def _write_fixed(self, pages: DirtyPages, durable: bool) -> None:
        for offset, chunks in pages.runs():
            await self._write_data(offset, chunks)
        self._unsynced = True
        faults.crash_point("flush-data-written")
        if durable:
            await self._sync()

    async def _write_sparse(self, pages: DirtyPages, durable: bool) -> None:
        image = self.image
        bits_first = image.kind == DiskType.DYNAMIC
        gained_bits: list[tuple[int, int, list[tuple[int, int]]]] = []
        after_sync: list[tuple[int, list[BlockRun]]] = []
        allocated: list[tuple[Allocation, SectorBitmap]] = []
        for block, runs in _split_by_block(pages.runs(), image.block_size):
            entry = self.cache.bat_entry(0, block)
            if entry == UNALLOCATED:
                if image.kind == DiskType.DYNAMIC and _all_zero(runs):
                    continue  # zeros into a dynamic image's hole: nothing to store
                allocated.append(await self._allocate(block, runs))
                continue
            bitmap = self.cache.bitmap(0, block, entry)
            base = image.data_offset(entry)
            missing = [
                (within // SECTOR, length // SECTOR)
                for within, length, _ in runs
                if bitmap.bits.find("0", within // SECTOR, (within + length) // SECTOR) >= 0
            ]
            if missing and bits_first:  # step A': bits now, data after the sync
                self._set_bits(block, entry, missing)
                after_sync.append((base, runs))
                continue
            for within, _, chunks in runs:
                await self._write_data(base + within, chunks)
            if missing:
                gained_bits.append((block, entry, missing))
        self._unsynced = True
        faults.crash_point("flush-data-written")
        metadata = bool(gained_bits or allocated or after_sync)
        if metadata or durable:
            await self._sync()  # step 3: nothing points at data that is not durable
        faults.crash_point("flush-data-synced")
        for base, runs in after_sync:
            for within, _, chunks in runs:
                await self._write_data(base + within, chunks)
        for block, entry, missing in gained_bits:  # step 4
            self._set_bits(block, entry, missing)
        faults.crash_point("flush-bitmaps-written")
        self._write_bat_entries([(a.block, a.entry) for a, _ in allocated])  # step 5
        for allocation, bitmap in allocated:
            self.cache.set_bat_entry(0, allocation.block, allocation.entry)
            self.cache.put_bitmap(0, allocation.block, bitmap)
            image.commit_allocation(allocation)
            del self._reserved[allocation.block]
        faults.crash_point("flush-bat-written")
        if metadata:
            self._unsynced = True
        if durable and metadata:
            await self._sync()  # step 6

    def _set_bits(self, block: int, entry: int, missing: list[tuple[int, int]]) -> None:
        """Write the bitmap of an allocated block with bits added for ``missing`` sectors."""
        # Fetched now, never kept across an await: while a flush waits, the cache may drop
        # and reload a bitmap, and only the file (written by flushes alone) is current.
        current = self.cache.bitmap(0, block, entry)
        updated = SectorBitmap(current.raw, self.image.sectors_per_block)
        for first, count in missing:
            updated.set_range(first, count)
        self._pwrite(entry * SECTOR, updated.raw)
        self.cache.put_bitmap(0, block, updated)

    async def _allocate(self, block: int, runs: list[BlockRun]) -> tuple[Allocation, SectorBitmap]:
        """Steps B1 and B2 for one new block: footer at the new end, then the block.

        A block whose earlier flush failed before its BAT entry was written reuses the room
        reserved then (the retry writes a superset of the same sectors), so persistent host
        errors do not grow the file.
        """
        image = self.image
        allocation = self._reserved.get(block)
        if allocation is None:
            allocation = self._reserved[block] = image.reserve_block(block)
        bitmap = SectorBitmap(bytes(image.bitmap_size), image.sectors_per_block)
        for within, length, _ in runs:
            bitmap.set_range(within // SECTOR, length // SECTOR)
        if allocation.end + FOOTER_SIZE >= image.file.size:  # still the last block
            self._pwrite(allocation.end, image.footer_raw)
        faults.crash_point("alloc-footer-written")
        if allocation.bitmap_offset < allocation.old_footer_end:
            # The bitmap goes over the old footer: make the new one durable first, so that
            # after a power cut the file still ends in a valid footer. (Otherwise the old
            # footer stays where it is, in the alignment gap before the bitmap, untouched.)
            await self._sync()
        self._pwrite(allocation.bitmap_offset, bitmap.raw)
        for within, _, chunks in runs:
            await self._write_data(allocation.data_offset + within, chunks)
        self._allocations += 1
        faults.crash_point("alloc-block-written")
        return allocation, bitmap

    def _write_bat_entries(self, entries: list[tuple[int, int]]) -> None:
        """Set BAT entries by read-patch-write of whole 512-byte sectors.

        Sectors of the file, not of the table: the table need not be sector-aligned.
        """
        if not entries:
            return
        header = self.image.header
        assert header is not None
        patches: dict[int, list[tuple[int, bytes]]] = {}
        for block, entry in entries:
            position = header.table_offset + 4 * block
            value = entry.to_bytes(4, "big")
            for byte in range(4):  # an entry may straddle two sectors of a misaligned BAT
                sector, within = divmod(position + byte, SECTOR)
                patches.setdefault(sector, []).append((within, value[byte : byte + 1]))
        for sector, items in sorted(patches.items()):
            raw = bytearray(self.image.file.pread_exact(sector * SECTOR, SECTOR, "BAT sector"))
            for within, value in items:
                raw[within : within + 1] = value
            self._pwrite(sector * SECTOR, raw)

    def statistics(self) -> WriteBackStatistics:
        """Current counters."""
        dirty = self.dirty.size + (self.inflight.size if self.inflight else 0)
        return WriteBackStatistics(
            dirty_bytes=dirty,
            flushes=self._flushes,
            host_writes=self._host_writes,
            syncs=self._syncs,
            allocations=self._allocations,
        )


#: Dirty data inside one block: ``(offset within the block, length, chunks)``.
BlockRun = tuple[int, int, Chunks]


def _split_by_block(
    runs: Iterator[tuple[int, Chunks]], block_size: int
) -> Iterator[tuple[int, list[BlockRun]]]:
    """Group disk runs by block: ``(block, [(offset within block, length, chunks), ...])``."""
    current = -1
    group: list[BlockRun] = []
    for run_offset, chunks in runs:
        offset = run_offset
        for chunk in chunks:
            pos = 0
            while pos < len(chunk):
                block, within = divmod(offset, block_size)
                count = min(block_size - within, len(chunk) - pos)
                piece = chunk[pos : pos + count]
                if block != current:
                    if group:
                        yield current, group
                    current, group = block, []
                if group and group[-1][0] + group[-1][1] == within:
                    last_within, last_length, last_chunks = group[-1]
                    last_chunks.append(piece)
                    group[-1] = (last_within, last_length + count, last_chunks)
                else:
                    group.append((within, count, [piece]))
                offset += count
                pos += count
    if group:
        yield current, group


def _all_zero(runs: list[BlockRun]) -> bool:
    return all(chunk == _ZERO_PAGE[: len(chunk)] for _, _, chunks in runs for chunk in chunks)
