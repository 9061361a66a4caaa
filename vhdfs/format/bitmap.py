"""Sector bitmaps of dynamic and differencing blocks.

Bit *k* of a block's bitmap says whether sector *k* is stored in this file; bits are
most-significant-first (mask ``0x80 >> k % 8``). A bitmap is kept both as its raw bytes and as
a string of ``'0'``/``'1'`` characters, one per sector: ``str.find`` then finds runs of equal
bits at C speed, which is what every read and write needs.
"""

from __future__ import annotations

from collections.abc import Iterable

from vhdfs.format.layout import SECTOR


def bitmap_bytes(sectors_per_block: int) -> int:
    """On-disk size of a block bitmap: one bit per sector, padded to whole sectors."""
    used = -(-sectors_per_block // 8)
    return -(-used // SECTOR) * SECTOR


class SectorBitmap:
    """The bitmap of one block, for ``sectors`` sectors (the rest of the padding is ignored).

    Args:
        raw: The bitmap as stored (at least ``ceil(sectors / 8)`` bytes).
        sectors: Sectors per block.
    """

    __slots__ = ("bits", "raw", "sectors")

    def __init__(self, raw: bytes | bytearray, sectors: int) -> None:
        self.sectors = sectors
        self.raw = bytearray(raw)
        used = -(-sectors // 8)
        value = int.from_bytes(self.raw[:used], "big")
        self.bits = format(value, f"0{used * 8}b")[:sectors]

    @property
    def nbytes(self) -> int:
        """Memory this bitmap holds (both representations), for cache budgets."""
        return len(self.raw) + len(self.bits)

    def is_full(self, first: int, count: int) -> bool:
        """True when every sector of ``[first, first + count)`` is present."""
        return self.bits.find("0", first, first + count) < 0

    def is_empty(self, first: int, count: int) -> bool:
        """True when no sector of ``[first, first + count)`` is present."""
        return self.bits.find("1", first, first + count) < 0

    def with_ranges(self, ranges: Iterable[tuple[int, int]]) -> SectorBitmap:
        """A copy with every ``(first sector, count)`` range of ``ranges`` marked present."""
        copy = SectorBitmap.__new__(SectorBitmap)
        copy.sectors, copy.raw, copy.bits = self.sectors, bytearray(self.raw), self.bits
        for first, count in ranges:
            copy.set_range(first, count)
        return copy

    def runs(self, first: int, count: int) -> list[tuple[int, int, bool]]:
        """Split sectors ``[first, first + count)`` into runs of equal state.

        Returns:
            ``(start_sector, sector_count, present)`` tuples in order.
        """
        bits = self.bits
        end = first + count
        if bits.find("0", first, end) < 0:
            return [(first, count, True)]
        if bits.find("1", first, end) < 0:
            return [(first, count, False)]
        out = []
        pos = first
        while pos < end:
            present = bits[pos] == "1"
            nxt = bits.find("0" if present else "1", pos, end)
            if nxt < 0:
                nxt = end
            out.append((pos, nxt - pos, present))
            pos = nxt
        return out

    def set_range(self, first: int, count: int) -> None:
        """Mark sectors ``[first, first + count)`` present, in both representations."""
        end = first + count
        self.bits = self.bits[:first] + "1" * count + self.bits[end:]
        # Only the bytes holding the range change (a 256 MiB block has a 64 KiB bitmap).
        low, high = first // 8, -(-end // 8)
        value = int(self.bits[low * 8 : high * 8].ljust((high - low) * 8, "0"), 2)
        self.raw[low:high] = value.to_bytes(high - low, "big")
