"""Where each structure of a dynamic or differencing image lies in its file, and the rule.

The spec fixes no order of structures. Real writers put the dynamic header elsewhere than at
512, locator data before or after the BAT, the BAT after the data blocks, and blocks in any
order with gaps between them. So nothing here assumes that metadata is a prefix of the file:
each structure is a ``Region`` of the file, and opening checks that every region lies inside
the file's data area (before the trailing footer) and that no two overlap. Those two rules are
what make it safe to read each structure where the header says it is, and to write a block
without touching anything else.

Blocks are checked in bulk (a 2 TiB image has a million of them): their starts are sorted once,
checked against each other by their common span, and each metadata region is looked up among
them by bisection.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_left
from typing import NamedTuple

from vhdfs.errors import CorruptMetadataError


class Region(NamedTuple):
    """Bytes ``[start, end)`` of an image file, and the structure that occupies them."""

    start: int
    end: int
    name: str

    def describe(self) -> str:
        """The region for a message: ``dynamic header at 512..1536``."""
        return f"{self.name} at {self.start}..{self.end}"


def check_disjoint(path: str, regions: list[Region]) -> list[Region]:
    """Return ``regions`` sorted by start; raise if two of them overlap.

    Empty regions are dropped (a zero-length locator occupies nothing).

    Raises:
        CorruptMetadataError: Two structures share bytes of the file.
    """
    ordered = sorted(region for region in regions if region.end > region.start)
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise CorruptMetadataError(path, f"{b.describe()} overlaps {a.describe()}")
    return ordered


def sorted_starts(starts: array[int]) -> array[int]:
    """Block starts (in sectors) in increasing order; usually they already are."""
    if all(a < b for a, b in itertools.pairwise(starts)):
        return starts
    return array("I", sorted(starts))


def first_block_overlap(starts: array[int], span: int) -> tuple[int, int] | None:
    """Two blocks (start sectors, sorted ``starts``) that share sectors, or ``None``.

    Args:
        starts: Start sectors of every allocated block, in increasing order.
        span: Sectors one block occupies (bitmap and data).
    """
    for a, b in itertools.pairwise(starts):
        if b - a < span:
            return a, b
    return None


def block_over(region: Region, starts: array[int], span_bytes: int, sector: int) -> int | None:
    """The start sector of a block overlapping ``region``, or ``None``.

    ``starts`` must be sorted and the blocks disjoint: then the last block starting before
    the region's end reaches furthest, and is the only one to look at.
    """
    index = bisect_left(starts, -(-region.end // sector)) - 1
    if index < 0:
        return None
    start = starts[index]
    if start * sector + span_bytes > region.start:
        return start
    return None
