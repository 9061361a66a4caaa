"""The write protocol of the image tools: emptying a child, compacting, resizing.

Like ``vhdfs.image.commit`` (which owns the order of data writes), this module decides in
what order the tools' bytes reach an image, and nothing else does: each planner turns a job
into steps (``vhdfs.image.steps``) that an executor carries out in order. Pure: no I/O. The
caller measures the image (``Shape``) and decides what may be dropped; the planner decides
where things go and in what order.

Rules every plan follows, besides those of ``commit``:

* Data is copied to free space only, synced, and only then pointed at (copy, sync, repoint,
  sync): a BAT entry always points at a fully written, synced block.
* The file shrinks last: the footer is first written at the new end (free space), synced,
  then the file is cut behind it. Until the cut, the old trailing footer is still the last
  512 bytes.
* Metadata that changes is written in single sectors where a torn write could break it: a
  BAT sector, the first sector of the dynamic header (its table offset, table size and
  checksum all lie there), a footer. The trailing footer changes before the copy at offset 0.

What a crash leaves at each crash point (the names of ``vhdfs.faults``):

============================  =================================================================
crash after                   state of the image on disk
============================  =================================================================
``empty-bat-cleared``         valid: the child holds nothing and reads through to its parent,
                              which holds the same data (a commit wrote it there first); the
                              blocks are leaked space until the cut
``empty-footer-written``      valid: two valid footers, the trailing one unchanged
``compact-dropped``           valid: all-zero blocks are unallocated (they read as zeros
                              either way) and leaked until they are reused or cut
``compact-moved``             valid: each moved block is read from its copy; the old places
                              are leaked
``compact-footer-written``    valid: two valid footers, the trailing one unchanged
``resize-footer-moved``       valid: the trailing footer, unchanged, lies further out; space
                              before it is leaked (fixed: the new disk space reads as zeros
                              only once the old footer bytes are zeroed, the next step)
``resize-bat-copied``         valid: the header still names the old BAT; the copy is leaked
``resize-header-written``     valid: the header names the new, larger BAT; the old one leaked
``resize-trailing-written``   valid: the trailing footer has the new size, the copy at offset
                              0 the old one (vhdfs opens it read-only until a rerun finishes)
(done)                        valid, durable
============================  =================================================================

A rerun after a crash finishes the job: each plan starts from what the image is then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vhdfs.format.bat import table_bytes
from vhdfs.format.geometry import geometry_to_store
from vhdfs.format.layout import (
    DATA_ALIGNMENT,
    FOOTER_SIZE,
    SECTOR,
    UNALLOCATED,
    DiskType,
)
from vhdfs.format.records import DynamicHeader, Footer, build_dynamic_header, build_footer
from vhdfs.image.regions import Region
from vhdfs.image.steps import (
    SYNC,
    CopyRange,
    CrashPoint,
    Step,
    Truncate,
    WriteFooter,
    WriteMeta,
    bat_patches,
)

#: Blocks copied between two syncs when compacting (bounded so a crash redoes little).
MOVES_PER_BATCH = 64


@dataclass(frozen=True, slots=True)
class Shape:
    """An image as the planners see it: where everything is."""

    kind: DiskType
    footer: Footer
    #: The trailing footer as stored (rewritten verbatim where it moves).
    footer_raw: bytes
    file_size: int
    #: Where the trailing footer starts (the end of everything else).
    trailing_offset: int
    header: DynamicHeader | None = None
    header_offset: int = 0
    bitmap_size: int = 0
    #: Every structure but the blocks, with the space reserved for each (``reserved``).
    metadata: tuple[Region, ...] = ()
    #: ``(block, entry)`` of every allocated block.
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def block_span(self) -> int:
        """Bytes a block occupies: bitmap and data."""
        assert self.header is not None
        return self.bitmap_size + self.header.block_size

    @property
    def metadata_end(self) -> int:
        """Where the last structure but the blocks ends."""
        return max((region.end for region in self.metadata), default=0)


def _aligned_start(position: int, bitmap_size: int) -> int:
    """The first block start at or after ``position`` whose data is 4 KiB-aligned."""
    data = -(-(position + bitmap_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT
    return data - bitmap_size


def _shrink_to(shape: Shape, end: int, point: str, file_size: int | None = None) -> list[Step]:
    """Move the trailing footer down to ``end`` (free space) and cut the file behind it."""
    end = -(-end // SECTOR) * SECTOR
    if end + FOOTER_SIZE >= (file_size or shape.file_size):
        return []
    return [
        WriteFooter(end, shape.footer_raw),
        SYNC,
        CrashPoint(point),
        Truncate(end + FOOTER_SIZE),
        SYNC,
    ]


# -- emptying a child (after its data went into the parent) ----------------------------------


def plan_empty(shape: Shape) -> list[Step]:
    """Unallocate every block of a differencing image and cut the file to its metadata."""
    assert shape.header is not None
    steps = bat_patches(shape.header.table_offset, [(b, UNALLOCATED) for b, _ in shape.blocks])
    if steps:
        steps += [SYNC, CrashPoint("empty-bat-cleared")]
    return steps + _shrink_to(shape, shape.metadata_end, "empty-footer-written")


# -- compacting ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompactPlan:
    """The steps of a compaction and what they achieve."""

    steps: list[Step]
    dropped: int
    moved: int
    new_size: int


def plan_compact(shape: Shape, droppable: set[int]) -> CompactPlan:
    """Drop the ``droppable`` blocks, pack the others down, and cut the file.

    The live blocks keep their order and are packed from the lowest place after (and
    between) the other structures, each with its data 4 KiB-aligned, so no free space is
    left but alignment padding. A block moves straight to its new place when that does not
    overlap its old one, several such moves sharing their syncs; when it does overlap (it moves
    down by less than its own size), it moves twice, through a place past everything else.
    A block is never copied over space that is still referenced, its own old place included.
    Blocks move, other structures do not: free space below a BAT that follows the blocks
    stays free once no block is left to fill it.
    """
    assert shape.header is not None
    table = shape.header.table_offset
    span = shape.block_span
    steps: list[Step] = []
    if droppable:
        dropped = [(block, entry) for block, entry in shape.blocks if block in droppable]
        steps += bat_patches(table, [(block, UNALLOCATED) for block, _ in dropped])
        steps += [SYNC, CrashPoint("compact-dropped")]
    live = sorted(
        (entry * SECTOR, block) for block, entry in shape.blocks if block not in droppable
    )
    metadata = sorted((r.start, r.end) for r in shape.metadata)
    targets = _pack(live, metadata, span, shape.bitmap_size)
    packer = _Packer(shape, table, span)
    for (start, block), target in zip(live, targets, strict=True):
        if target == start:
            continue
        if target + span <= start:
            packer.move(block, start, target)
        else:
            packer.bounce(block, start, target)
    steps += packer.finish()
    end = max([shape.metadata_end, *(target + span for target in targets)])
    steps += _shrink_to(shape, end, "compact-footer-written", packer.file_size)
    new_size = min(-(-end // SECTOR) * SECTOR + FOOTER_SIZE, packer.file_size)
    return CompactPlan(steps, len(droppable), packer.moved, new_size)


def _pack(
    live: list[tuple[int, int]], metadata: list[tuple[int, int]], span: int, bitmap_size: int
) -> list[int]:
    """Where each live block goes, in the order given.

    The lowest aligned place past the previous block that overlaps no other structure, and
    never above where the block is now.
    """
    targets, cursor = [], 0
    for start, _ in live:
        target = _aligned_start(cursor, bitmap_size)
        for low, high in metadata:  # sorted: a clash moves the place past that structure
            if target < high and target + span > low:
                target = _aligned_start(high, bitmap_size)
        target = min(target, start)
        targets.append(target)
        cursor = target + span
    return targets


class _Packer:
    """The moves of ``plan_compact``: straight ones batched, overlapping ones bounced."""

    def __init__(self, shape: Shape, table: int, span: int) -> None:
        self.shape = shape
        self.table = table
        self.span = span
        self.file_size = shape.file_size
        self.steps: list[Step] = []
        self.batch: list[tuple[int, int, int]] = []
        self.moved = 0
        self.bounce_at: int | None = None

    def move(self, block: int, start: int, target: int) -> None:
        """Move ``block`` from ``start`` to a ``target`` that does not overlap it."""
        # A target over the old place of a block moved in this batch must wait until that
        # block's repoint is durable.
        if len(self.batch) >= MOVES_PER_BATCH or any(
            target < old + self.span and old < target + self.span for _, old, _ in self.batch
        ):
            self._flush()
        self.batch.append((block, start, target))
        self.moved += 1

    def bounce(self, block: int, start: int, target: int) -> None:
        """Move ``block`` to an overlapping ``target`` through a place past everything."""
        self._flush()
        if self.bounce_at is None:
            # Past everything: the footer moves out first, as for a new block.
            self.bounce_at = _aligned_start(self.shape.trailing_offset, self.shape.bitmap_size)
            end = self.bounce_at + self.span
            self.steps.append(WriteFooter(end, self.shape.footer_raw))
            if self.bounce_at < self.file_size:
                self.steps.append(SYNC)  # the copy goes over the old footer: the new one first
            self.file_size = end + FOOTER_SIZE
        self.batch.append((block, start, self.bounce_at))
        self._flush()
        self.batch.append((block, self.bounce_at, target))
        self._flush()
        self.moved += 1

    def _flush(self) -> None:
        if not self.batch:
            return
        self.steps += [CopyRange(old, new, self.span) for _, old, new in self.batch]
        self.steps.append(SYNC)
        self.steps += bat_patches(self.table, [(b, new // SECTOR) for b, _, new in self.batch])
        self.steps += [SYNC, CrashPoint("compact-moved")]
        self.batch = []

    def finish(self) -> list[Step]:
        """The steps of every move."""
        self._flush()
        return self.steps


# -- resizing ------------------------------------------------------------------------------


def resized_footer(footer: Footer, size: int) -> Footer:
    """The footer of ``footer``'s image at ``size`` bytes: both sizes and the geometry change.

    Original size changes too: libvhdi sizes disks by it.
    """
    return replace(footer, current_size=size, original_size=size, geometry=geometry_to_store(size))


def plan_resize_fixed(shape: Shape, size: int) -> list[Step]:
    """Grow or shrink a fixed image to ``size`` bytes.

    Shrinking: the caller checked that everything past ``size`` is zeros.
    """
    old = shape.trailing_offset
    new_footer = build_footer(resized_footer(shape.footer, size))
    if size > old:
        # The old footer moves out first, unchanged, so the file always ends in a valid
        # footer; its old bytes, now disk space, become zeros; then the size changes.
        return [
            WriteFooter(size, build_footer(shape.footer)),
            SYNC,
            CrashPoint("resize-footer-moved"),
            WriteMeta(old, bytes(shape.file_size - old), "the old footer, zeroed"),
            SYNC,
            WriteFooter(size, new_footer),
            SYNC,
            CrashPoint("resize-trailing-written"),
        ]
    return [
        WriteFooter(size, new_footer),
        SYNC,
        CrashPoint("resize-trailing-written"),
        Truncate(size + FOOTER_SIZE),
        SYNC,
    ]


@dataclass(frozen=True, slots=True)
class ResizePlan:
    """The steps of a resize of a dynamic image, and whether the BAT moved."""

    steps: list[Step]
    relocated_table: bool


def plan_resize_dynamic(
    shape: Shape, size: int, table_entries: int, stale: tuple[int, ...] = ()
) -> ResizePlan:
    """Give a dynamic image ``size`` bytes.

    Args:
        shape: The image.
        size: The new virtual size (shrinking: the caller checked that no allocated data
            lies past it).
        table_entries: BAT entries the new size needs; if the table holds fewer, a new one
            with that many entries goes to the end of the file and the header names it.
        stale: Blocks the new size brings into the disk whose entries in a table kept as it
            is are not "unallocated" (a table with room for growth that held garbage there):
            they are unallocated first.
    """
    header = shape.header
    assert header is not None
    new_footer = resized_footer(shape.footer, size)
    steps: list[Step] = []
    if stale:
        steps += bat_patches(header.table_offset, [(block, UNALLOCATED) for block in stale])
        steps.append(SYNC)
    relocated = table_entries > header.max_table_entries
    footer_raw = build_footer(new_footer)
    end = shape.trailing_offset
    if relocated:
        position = -(-end // DATA_ALIGNMENT) * DATA_ALIGNMENT
        table = bytearray(b"\xff" * table_bytes(table_entries))
        for block, entry in shape.blocks:
            table[4 * block : 4 * block + 4] = entry.to_bytes(4, "big")
        end = position + len(table)
        new_header = replace(header, table_offset=position, max_table_entries=table_entries)
        raw_header = build_dynamic_header(new_header)
        old_second = build_dynamic_header(header)[SECTOR:]
        assert raw_header[SECTOR:] == old_second, "only the header's first sector may change"
        steps += [WriteFooter(end, shape.footer_raw), CrashPoint("resize-footer-moved")]
        if position < shape.file_size:
            steps.append(SYNC)  # the table goes over the old footer: the new one first
        steps += [
            WriteMeta(position, bytes(table), "the relocated BAT"),
            SYNC,
            CrashPoint("resize-bat-copied"),
            WriteMeta(shape.header_offset, raw_header[:SECTOR], "the dynamic header"),
            SYNC,
            CrashPoint("resize-header-written"),
        ]
    steps += [
        WriteFooter(end, footer_raw),
        SYNC,
        CrashPoint("resize-trailing-written"),
        WriteMeta(0, footer_raw, "the footer copy"),
        SYNC,
    ]
    return ResizePlan(steps, relocated)
