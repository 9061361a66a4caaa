"""``vhd compact``: give back the space of a dynamic or differencing image, in place.

Blocks that hold nothing are unallocated (in a dynamic image: all zeros, whatever the bitmap
says; in a differencing image: no sector present, since zeros there may hide the parent's
data), leaked space is reclaimed, blocks move down into the holes and the file is cut. The
order of every write (copy, sync, repoint, sync; footer, sync, cut) is
``vhdfs.image.reshape.plan_compact``'s. Images with blktap's batmap keep their all-zero
blocks: unallocating one would also need the batmap rewritten, which vhdfs does not do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vhdfs.errors import ImageError, UsageError
from vhdfs.format.layout import DiskType
from vhdfs.image.reshape import plan_compact
from vhdfs.image.vhd import VhdImage
from vhdfs.tools.apply import apply
from vhdfs.tools.shape import shape_of

#: ``progress(bytes done, bytes in all)``.
Progress = Callable[[int, int], None]
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class CompactReport:
    """What ``compact`` did."""

    image: str
    old_size: int
    new_size: int
    blocks_dropped: int
    blocks_moved: int
    #: All-zero blocks were kept because the image has a blktap batmap.
    kept_zero_blocks: bool

    @property
    def bytes_reclaimed(self) -> int:
        """How much smaller the file is."""
        return self.old_size - self.new_size


def compact(path: str, progress: Progress | None = None) -> CompactReport:
    """Compact the image at ``path`` in place.

    Raises:
        UsageError: A fixed image (it has no blocks).
        VhdfsError: The image is unusable, in use, unsafe to write, or host I/O failed.
    """
    image = VhdImage.open(path, writable=True)
    try:
        image.file.lock(exclusive=True)
        if image.kind == DiskType.FIXED:
            raise UsageError(
                path, "a fixed image has no blocks to compact (vhd convert makes it dynamic)"
            )
        problem = image.write_problem()
        if problem is not None:
            raise ImageError(path, f"cannot compact: {problem}")
        shape = shape_of(image)
        has_batmap = any(region.name == "batmap" for region in image.metadata)
        total = len(shape.blocks) * shape.block_span
        done = 0

        def report_progress(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(min(done, total), total)

        droppable = set() if has_batmap else _empty_blocks(image, shape.blocks, report_progress)
        plan = plan_compact(shape, droppable)
        apply(plan.steps, image.file, report_progress)
        return CompactReport(
            path,
            shape.file_size,
            image.file.size,
            plan.dropped,
            plan.moved,
            has_batmap,
        )
    finally:
        image.close()


def _empty_blocks(
    image: VhdImage, blocks: tuple[tuple[int, int], ...], progress: Callable[[int], None]
) -> set[int]:
    """Blocks that hold nothing: all zeros (dynamic), no sector present (differencing)."""
    empty = set()
    for block, entry in blocks:
        bitmap = image.read_bitmap(entry)
        if image.kind == DiskType.DIFFERENCING:
            if bitmap.runs(0, image.sectors_per_block) == [(0, image.sectors_per_block, False)]:
                empty.add(block)
            progress(image.bitmap_size)
            continue
        if _all_zero(image, image.data_offset(entry), image.block_size):
            empty.add(block)
        progress(image.block_span)
    return empty


def _all_zero(image: VhdImage, offset: int, length: int) -> bool:
    position = offset
    while position < offset + length:
        count = min(len(_ZEROS), offset + length - position)
        if image.file.pread_exact(position, count, "block data") != _ZEROS[:count]:
            return False
        position += count
    return True
