"""``vhd resize``: grow a fixed or dynamic image, or shrink one when nothing is lost.

A dynamic image whose BAT has no room for the new size gets a new, larger BAT at the end of
the file (the header names it once it is written and synced). Shrinking needs ``shrink`` and
is refused while data lies past the new end. A differencing image has its parent's size and
cannot be resized alone. The order of every write is ``vhdfs.image.reshape``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhdfs.errors import ImageError, UsageError
from vhdfs.format.bat import BAT_PAGE_ENTRIES, decode_entries
from vhdfs.format.layout import SECTOR, UNALLOCATED, DiskType
from vhdfs.image.create import check_size
from vhdfs.image.reshape import plan_resize_dynamic, plan_resize_fixed
from vhdfs.image.vhd import VhdImage
from vhdfs.tools.apply import apply
from vhdfs.tools.shape import shape_of

_ZEROS = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class ResizeReport:
    """What ``resize`` did."""

    image: str
    old_size: int
    new_size: int
    #: A new, larger BAT was written at the end of the file.
    relocated_table: bool


def resize(path: str, size: int, *, shrink: bool = False) -> ResizeReport:
    """Give the image at ``path`` a virtual size of ``size`` bytes.

    Raises:
        UsageError: A differencing image, a bad size, or shrinking without ``shrink`` or
            over data.
        VhdfsError: The image is unusable, in use, unsafe to write, or host I/O failed.
    """
    check_size(size)
    image = VhdImage.open(path, writable=True)
    try:
        image.file.lock(exclusive=True)
        old = image.virtual_size
        if image.kind == DiskType.DIFFERENCING:
            raise UsageError(
                path,
                "a differencing image has its parent's size and cannot be resized alone; "
                "commit it (vhd commit) or resize its parent and recreate it",
            )
        interrupted = image.resize_interrupted()
        problem = image.write_problem()
        if problem is not None and not interrupted:
            raise ImageError(path, f"cannot resize: {problem}")
        if size < old and not shrink:
            raise UsageError(path, f"{size} is smaller than {old}: shrinking needs --shrink")
        if size == old and not interrupted:
            return ResizeReport(path, old, size, False)
        if size < old:
            _check_nothing_past(image, size)
        shape = shape_of(image)
        if image.kind == DiskType.FIXED:
            apply(plan_resize_fixed(shape, size), image.file)
            return ResizeReport(path, old, size, False)
        entries = -(-size // image.block_size)
        plan = plan_resize_dynamic(shape, size, entries, _stale_entries(image, entries))
        apply(plan.steps, image.file)
        return ResizeReport(path, old, size, plan.relocated_table)
    finally:
        image.close()


def _check_nothing_past(image: VhdImage, size: int) -> None:
    """Refuse a shrink that would cut data off."""
    if image.kind == DiskType.FIXED:
        position = size
        while position < image.virtual_size:
            count = min(len(_ZEROS), image.virtual_size - position)
            if image.file.pread_exact(position, count, "disk data") != _ZEROS[:count]:
                raise UsageError(image.path, f"data lies past the new end {size}: not shrunk")
            position += count
        return
    first_sector = size // SECTOR
    for block in range(first_sector * SECTOR // image.block_size, image.bat_entries):
        page, slot = divmod(block, BAT_PAGE_ENTRIES)
        entry = image.read_bat_page(page)[slot]
        if entry == UNALLOCATED:
            continue
        start = max(0, first_sector - block * image.sectors_per_block)
        runs = image.read_bitmap(entry).runs(start, image.sectors_per_block - start)
        if any(present for _, _, present in runs):
            raise UsageError(
                image.path, f"block {block} holds data past the new end {size}: not shrunk"
            )


def _stale_entries(image: VhdImage, entries: int) -> tuple[int, ...]:
    """Entries a grown disk newly uses, kept in a table with room, that are not unallocated."""
    header = image.header
    assert header is not None
    first, last = image.bat_entries, min(entries, header.max_table_entries)
    if last <= first:
        return ()
    raw = image.file.pread_exact(header.table_offset + 4 * first, 4 * (last - first), "BAT")
    return tuple(first + i for i, entry in enumerate(decode_entries(raw)) if entry != UNALLOCATED)
