"""The on-disk write protocol: everything that decides in what order bytes reach an image.

Like h11's ``_state.py``, this file owns the rules; nothing else decides an order. It is pure:
no I/O, no trio. A planner turns a job (here, committing dirty data of the virtual disk) into
an ordered list of steps: write data, write a bitmap, write the footer, patch BAT sectors,
sync, crash point. Executors (the mount's write-back layer, the image tools) carry the steps
out in order and never reorder or skip them. The step types (``vhdfs.image.steps``) are plain
records, so plans can be property-tested without a file.

Rules every plan follows
========================

* The footer copy at offset 0 and the dynamic header never change while data is committed.
* The last 512 bytes of the file are a valid footer at every instant.
* A sector whose bitmap bit is clear holds zeros on disk at every instant (QEMU and other
  readers ignore bitmaps and read it). New blocks lie past the old end of file, where unwritten
  sectors are holes.
* Nothing on disk points at data that is not durable: a sync separates the data of a block
  from the BAT entry that makes it reachable, and the data of a differencing disk from the
  bitmap bits that make it replace the parent's.
* BAT sectors are written whole (a torn 4-byte write could spread to its neighbours).

Order of one commit of dirty data (dynamic and differencing images)
===================================================================

For each dirty block:

A. Block already allocated, sectors already present: write the data sectors into it.
A'. Block already allocated, sectors gaining their bit:

   * dynamic image: write the bitmap with the new bits now and the data after step 3. A
     clear bit meant zeros, and the sectors hold zeros until their data lands, so the disk
     reads the old contents or the new, never anything else, in every reader;
   * differencing image: write the data now and the bitmap in step 4. A clear bit means "the
     parent's sector": a bit set over unwritten data would hide it.

B. Block not allocated (for a dynamic image, only if the data is not all zeros; all-zero writes
   to an unallocated block allocate nothing). Its place is reserved first (``Reserve``): the
   room stays taken even if a later step fails, and a retry of the block reuses it.
   1. write the footer, unchanged, at the new end of file E (the old trailing footer is still
      intact until now, so the last 512 bytes of the file are always a valid footer);
   2. write the block's bitmap with bits for exactly the sectors being written, and those
      sectors' data. The block lies past the old end of file, so its unwritten sectors are a
      hole and read as zeros. The old footer is left where it is, in the alignment gap
      before the bitmap; in the rare layout where the bitmap covers it, the new footer is
      synced first, so a power cut cannot leave the file without a valid trailing footer.

Then, once for the whole commit:

3. Sync, if any bitmap or BAT update follows or was made in A' (or the commit must be
   durable); then write the data of A' (dynamic).
4. Write the bitmap sectors of differencing blocks that gained bits (their data is durable).
5. Write each BAT sector that gains entries, read from the file and patched, as a whole
   512-byte sector.
6. Sync again if the commit must be durable.

What a crash (kill -9, power loss) leaves behind at each point (the names are the crash
points of ``vhdfs.faults``, where the crash tests stop the daemon):

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

Fixed images have no metadata: data is written in place (``flush-data-written``) and synced
when durability is asked.

Writes in place
===============

Step A needs no order with anything, so the write-back layer does it at once, without staging
(``WriteBack.write_in_place``), for a write whose sectors the leaf already holds (a fixed
image, or an allocated block with their bits set) — provided no older write of those sectors
is still dirty or in a flush, which would otherwise land after it. Like step A it is durable
at the next sync, which the next ``fsync`` makes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import FOOTER_SIZE, SECTOR, UNALLOCATED, DiskType
from vhdfs.image.steps import (
    SYNC,
    Allocation,
    BlockMeta,
    BlockRun,
    Chunks,
    Commit,
    CrashPoint,
    Reserve,
    Step,
    Target,
    WriteBitmap,
    WriteData,
    WriteFooter,
    bat_patches,
    place_block,
)

# -- planning a commit of dirty data --------------------------------------------------------


def plan_flush(
    target: Target,
    runs: Iterable[tuple[int, Chunks]],
    meta: BlockMeta,
    reserved: dict[int, Allocation],
    *,
    durable: bool,
) -> list[Step]:
    """The steps that write dirty ``runs`` (disk offset, buffers) into ``target``.

    Args:
        target: The image (its leaf, layer 0 of ``meta``).
        runs: Dirty runs of whole sectors, in disk order.
        meta: BAT entries and bitmaps as they are now.
        reserved: Blocks whose room an earlier, failed commit reserved (reused, not grown).
        durable: End with everything synced.

    Raises:
        NoRoomError: A new block cannot be placed.
    """
    if target.kind == DiskType.FIXED:
        steps: list[Step] = [WriteData(offset, chunks) for offset, chunks in runs]
        steps.append(CrashPoint("flush-data-written"))
        if durable:
            steps.append(SYNC)
        return steps
    return _SparsePlan(target, meta, reserved).plan(runs, durable)


class _SparsePlan:
    """One commit into a dynamic or differencing image (see the module docstring)."""

    def __init__(self, target: Target, meta: BlockMeta, reserved: dict[int, Allocation]) -> None:
        self.target = target
        self.meta = meta
        self.reserved = reserved
        self.next_free = target.next_free
        self.file_size = target.file_size
        self.before_sync: list[Step] = []
        self.after_sync_data: list[Step] = []
        self.after_sync_bitmaps: list[Step] = []
        self.allocated: list[Commit] = []

    def plan(self, runs: Iterable[tuple[int, Chunks]], durable: bool) -> list[Step]:
        target = self.target
        dynamic = target.kind == DiskType.DYNAMIC
        for block, block_runs in split_by_block(runs, target.block_size):
            entry = self.meta.bat_entry(0, block)
            if entry == UNALLOCATED:
                if not (dynamic and _all_zero(block_runs)):
                    self._allocate(block, block_runs)
                continue
            self._existing(block, entry, block_runs, dynamic)
        steps = self.before_sync
        steps.append(CrashPoint("flush-data-written"))
        metadata = bool(self.allocated or self.after_sync_data or self.after_sync_bitmaps)
        if metadata or durable:
            steps.append(SYNC)
        steps.append(CrashPoint("flush-data-synced"))
        steps += self.after_sync_data
        steps += self.after_sync_bitmaps
        steps.append(CrashPoint("flush-bitmaps-written"))
        entries = [(c.allocation.block, c.allocation.entry) for c in self.allocated]
        steps += bat_patches(target.table_offset, entries)
        steps += self.allocated
        steps.append(CrashPoint("flush-bat-written"))
        if durable and metadata:
            steps.append(SYNC)
        return steps

    def _existing(self, block: int, entry: int, runs: list[BlockRun], dynamic: bool) -> None:
        """Steps A and A' for a block that is already allocated."""
        bitmap = self.meta.bitmap(0, block, entry)
        base = entry * SECTOR + self.target.bitmap_size
        missing = [
            (within // SECTOR, length // SECTOR)
            for within, length, _ in runs
            if not bitmap.is_full(within // SECTOR, length // SECTOR)
        ]
        data = [WriteData(base + within, chunks) for within, _, chunks in runs]
        if not missing:
            self.before_sync += data
            return
        bits = WriteBitmap(block, entry * SECTOR, bitmap.with_ranges(missing), cached=True)
        if dynamic:  # A': bits now, over zeros; the data once they are durable
            self.before_sync.append(bits)
            self.after_sync_data += data
        else:  # A': the data now; the bits once it is durable
            self.before_sync += data
            self.after_sync_bitmaps.append(bits)

    def _allocate(self, block: int, runs: list[BlockRun]) -> None:
        """Steps B1 and B2 for a new block."""
        target = self.target
        allocation = self.reserved.get(block)
        if allocation is None:
            allocation = place_block(target, self.next_free, self.file_size, block)
            self.next_free = allocation.end
            self.before_sync.append(Reserve(allocation))
        empty = SectorBitmap(bytes(target.bitmap_size), target.sectors_per_block)
        bitmap = empty.with_ranges((w // SECTOR, length // SECTOR) for w, length, _ in runs)
        steps = self.before_sync
        if allocation.end + FOOTER_SIZE >= self.file_size:  # still the last block
            steps.append(WriteFooter(allocation.end, target.footer))
            self.file_size = allocation.end + FOOTER_SIZE
        steps.append(CrashPoint("alloc-footer-written"))
        if allocation.bitmap_offset < allocation.old_footer_end:
            # The bitmap goes over the old footer: make the new one durable first, so that
            # after a power cut the file still ends in a valid footer.
            steps.append(SYNC)
        steps.append(WriteBitmap(block, allocation.bitmap_offset, bitmap, cached=False))
        steps += [WriteData(allocation.data_offset + within, chunks) for within, _, chunks in runs]
        steps.append(CrashPoint("alloc-block-written"))
        self.allocated.append(Commit(allocation, bitmap))


def split_by_block(
    runs: Iterable[tuple[int, Chunks]], block_size: int
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


_ZEROS = bytes(1 << 16)


def _is_zero(chunk: memoryview) -> bool:
    for pos in range(0, len(chunk), len(_ZEROS)):
        piece = chunk[pos : pos + len(_ZEROS)]
        if piece != _ZEROS[: len(piece)]:
            return False
    return True


def _all_zero(runs: list[BlockRun]) -> bool:
    return all(_is_zero(chunk) for _, _, chunks in runs for chunk in chunks)
