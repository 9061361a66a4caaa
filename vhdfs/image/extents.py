"""Extents: what a range of the virtual disk reads as, as typed runs.

``Chain.plan_read`` maps a byte range of the disk to extents, in disk order: each says which
layer's file holds the bytes and where, or that they read as zeros (no layer has them, or the
range lies past a layer's end). Executing a plan is one host read per extent with a layer,
nothing for the zero ones.
"""

from __future__ import annotations

from typing import NamedTuple


class Extent(NamedTuple):
    """A run of the virtual disk: ``length`` bytes at disk ``offset``.

    ``layer`` indexes ``Chain.layers``; ``None`` means the run reads as zeros (``host`` is
    then 0). Otherwise the bytes are at ``host`` in that layer's file.
    """

    offset: int
    length: int
    layer: int | None
    host: int

    @classmethod
    def zeros(cls, offset: int, length: int) -> Extent:
        """A run that reads as zeros."""
        return cls(offset, length, None, 0)


def merge(extents: list[Extent]) -> list[Extent]:
    """Sort ``extents`` and join neighbours.

    Zeros join zeros, and runs of one layer join when they are contiguous in its file too
    (so each becomes one host read).
    """
    extents.sort(key=lambda e: e.offset)
    merged: list[Extent] = []
    for extent in extents:
        if merged:
            last = merged[-1]
            if (
                last.layer == extent.layer
                and last.offset + last.length == extent.offset
                and (last.layer is None or last.host + last.length == extent.host)
            ):
                merged[-1] = last._replace(length=last.length + extent.length)
                continue
        merged.append(extent)
    return merged
