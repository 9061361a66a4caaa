"""Measure an opened image for the structural planners (``vhdfs.image.reshape.Shape``)."""

from __future__ import annotations

from vhdfs.format.bat import BAT_PAGE_ENTRIES
from vhdfs.format.layout import UNALLOCATED
from vhdfs.image.reshape import Shape
from vhdfs.image.vhd import VhdImage


def allocated_blocks(image: VhdImage) -> list[tuple[int, int]]:
    """``(block, BAT entry)`` of every allocated block, read from the file."""
    out = []
    for page in range(image.bat_pages):
        for block, entry in enumerate(image.read_bat_page(page), page * BAT_PAGE_ENTRIES):
            if entry != UNALLOCATED:
                out.append((block, entry))
    return out


def shape_of(image: VhdImage) -> Shape:
    """Where everything of ``image`` is."""
    return Shape(
        kind=image.kind,
        footer=image.footer,
        footer_raw=image.footer_raw,
        file_size=image.file.size,
        trailing_offset=image.trailing_footer_offset,
        header=image.header,
        header_offset=image.footer.data_offset if image.header is not None else 0,
        bitmap_size=image.bitmap_size,
        metadata=tuple(image.reserved),
        blocks=tuple(allocated_blocks(image)) if image.header is not None else (),
    )
