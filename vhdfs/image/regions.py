"""Where each structure of a dynamic or differencing image lies in its file, and the rule.

The spec fixes no order of structures. Real writers put the dynamic header elsewhere than at
512, locator data before or after the BAT, the BAT after the data blocks, and blocks in any
order with gaps between them. So nothing here assumes that metadata is a prefix of the file:
each structure is a ``Region`` of the file, and opening checks that every region lies inside
the file's data area (before the trailing footer) and that no two overlap. Those two rules are
what make it safe to read each structure where the header says it is, and to write a block
without touching anything else.

Blocks are checked one by one as the BAT streams by (a 2 TiB image has a million of them, and
a hostile table claims billions): each against the metadata at once, by bisection among a few
regions (``MetadataGuard``); against the other blocks at once while they come in increasing
order, as writers place them, and otherwise by sorting what was kept (``BlockStarts``). What
is kept is bounded by what the file can hold (``block_capacity``): one block more than fits
proves an overlap, so a table's claims never cost more memory than the file's own size allows.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from bisect import bisect_right
from collections.abc import Iterator
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


def block_capacity(metadata: list[Region], limit: int, span: int) -> int:
    """The most blocks of ``span`` bytes that fit, disjoint, in ``[0, limit)`` beside ``metadata``.

    Every block lies before ``limit`` and clear of metadata and of the others, so the blocks of
    a sound image never outnumber this; one more proves that two of them overlap.
    """
    free = limit - sum(region.end - region.start for region in metadata)
    return max(free, 0) // span


class MetadataGuard:
    """Which metadata region a block starting at a given sector overlaps, by bisection.

    Args:
        metadata: The regions, sorted by start and disjoint (as ``check_disjoint`` returns them).
        span: Bytes one block occupies (bitmap and data).
        sector: Bytes per sector (BAT entries count sectors).
    """

    def __init__(self, metadata: list[Region], span: int, sector: int) -> None:
        self._regions = metadata
        # A block at sector s covers [s * sector, s * sector + span): it overlaps [start, end)
        # exactly when s lies in [first, stop) below. Both bounds grow with the regions, which
        # is what makes one bisection enough.
        self._firsts = [(region.start - span) // sector + 1 for region in metadata]
        self._stops = [-(-region.end // sector) for region in metadata]

    def touches(self, low: int, high: int) -> bool:
        """Whether a block starting anywhere in sectors ``[low, high]`` could overlap a region."""
        index = bisect_right(self._firsts, high) - 1
        return index >= 0 and self._stops[index] > low

    def region_over(self, start: int) -> Region | None:
        """The first region the block starting at sector ``start`` overlaps, or ``None``."""
        index = bisect_right(self._firsts, start) - 1
        if index < 0 or start >= self._stops[index]:
            return None
        # The block may be long enough to reach back into earlier regions: name the first.
        while index > 0 and start < self._stops[index - 1]:
            index -= 1
        return self._regions[index]


#: Starts are sorted this many at a time, in place, then merged: a list of this many Python
#: integers (about 2 MiB) is all the sort needs beside the array, whatever the number of blocks.
SORT_CHUNK = 1 << 16

#: Out-of-order starts are checked against each other when this many are kept, then each time
#: their number doubles: an overlap is found soon after it appears, and a table that repeats
#: itself (cheap to store on a file system that shares or compresses extents) is refused
#: before it costs memory, at most twice the work of one check at the end.
FIRST_INTERIM_CHECK = 1 << 20


def iter_sorted(starts: array[int]) -> Iterator[int]:
    """The values of ``starts`` in increasing order, in bounded extra memory.

    ``starts`` is sorted in place chunk by chunk (its order changes, its contents do not) and
    the chunks are merged lazily; it must not be resized while the iterator is in use.
    """
    for first in range(0, len(starts), SORT_CHUNK):
        chunk = starts[first : first + SORT_CHUNK]
        starts[first : first + SORT_CHUNK] = array(starts.typecode, sorted(chunk))
    view = memoryview(starts)
    runs = [view[first : first + SORT_CHUNK] for first in range(0, len(starts), SORT_CHUNK)]
    # Blocks placed in order, or in reverse, or in a few sweeps, sort into runs that do not
    # interleave: those are read one after the other, without the cost of a merge.
    runs.sort(key=lambda run: run[0])
    if all(a[-1] <= b[0] for a, b in itertools.pairwise(runs)):
        return itertools.chain.from_iterable(runs)
    return heapq.merge(*runs)


class BlockStarts:
    """Start sectors of the blocks met so far, each checked against the others as it comes.

    Blocks that come in increasing order (as writers place them, whatever the order of the
    other structures) are checked against the one before, at once, and that is all they need.
    Once one comes lower than the one before, every start kept is checked by sorting: at
    ``FIRST_INTERIM_CHECK`` starts and at each doubling, then once at the end (``finish``).
    The caller bounds how many are kept (see ``block_capacity``).

    Args:
        span: Sectors one block occupies (bitmap and data).
    """

    def __init__(self, span: int) -> None:
        self.span = span
        self.starts = array("I")
        #: Highest start met, -1 before the first.
        self.highest = -1
        self._previous = -span
        self._ordered = True
        self._next_check = FIRST_INTERIM_CHECK

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, starts: array[int]) -> tuple[int, int] | None:
        """Keep ``starts`` (in BAT order); return two starts that overlap, if found now.

        The pair is given lower first.
        """
        if not starts:
            return None
        span = self.span
        previous = self._previous
        for start in starts:
            if start - previous < span:
                if previous - start < span:
                    return min(previous, start), max(previous, start)
                self._ordered = False
            previous = start
        self._previous = previous
        self.starts.extend(starts)
        self.highest = max(self.highest, max(starts))
        if not self._ordered and len(self.starts) >= self._next_check:
            self._next_check = 2 * len(self.starts)
            return self.first_overlap()
        return None

    def finish(self) -> tuple[int, int] | None:
        """Two starts (lower first) of blocks that overlap among all those kept, or ``None``."""
        return None if self._ordered else self.first_overlap()

    def first_overlap(self) -> tuple[int, int] | None:
        """The lowest two starts of blocks that share sectors, or ``None``."""
        for lower, upper in itertools.pairwise(iter_sorted(self.starts)):
            if upper - lower < self.span:
                return lower, upper
        return None
