"""The vocabulary of write plans: the steps, the target image, and where new blocks go.

A plan is a list of these records, made by a planner (``vhdfs.image.commit``) and carried out
in order by an executor. They are plain data, so plans can be compared and property-tested
without a file.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from vhdfs.format.bat import encode_entries
from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import DATA_ALIGNMENT, SECTOR, UNALLOCATED, DiskType

#: A run of data as the buffers it is made of (views, never copied).
Chunks = list[memoryview]
#: Dirty data inside one block: ``(offset within the block, length, chunks)``.
BlockRun = tuple[int, int, Chunks]


# -- what the planner needs to know -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The image a plan writes into, as the planner sees it."""

    kind: DiskType
    block_size: int
    bitmap_size: int
    #: Absolute offset of the BAT (0 for fixed images).
    table_offset: int
    #: The trailing footer as stored; rewritten verbatim where it moves.
    footer: bytes
    file_size: int
    #: Where the next block may start (past every structure and the footer).
    next_free: int

    @property
    def sectors_per_block(self) -> int:
        """Sectors of data in a block."""
        return self.block_size // SECTOR


class BlockMeta(Protocol):
    """Synchronous lookups of the target's BAT entries and bitmaps (the block cache)."""

    def bat_entry(self, layer: int, block: int) -> int:
        """BAT entry of ``block`` (UNALLOCATED if none)."""

    def bitmap(self, layer: int, block: int, entry: int) -> SectorBitmap:
        """Sector bitmap of the allocated ``block``."""


@dataclass(frozen=True, slots=True)
class Allocation:
    """The placement of a new block (all offsets in bytes of the file)."""

    block: int
    #: The BAT entry: the sector of the block's bitmap.
    entry: int
    #: The end of file when the room was reserved: the old trailing footer ends here, and
    #: everything of the block from here on is a hole, so unwritten sectors read as zeros.
    old_footer_end: int
    bitmap_offset: int
    data_offset: int
    #: End of the block, where the trailing footer moves.
    end: int


class NoRoomError(Exception):
    """A new block would start past the last sector a 32-bit BAT entry can address."""


def place_block(target: Target, next_free: int, file_size: int, block: int) -> Allocation:
    """Where block ``block`` goes: past everything, its data on a 4 KiB boundary.

    It never reuses space that might hold stale bytes (padding, leaked blocks, junk after the
    footer), so nothing old can surface as guest data.

    Raises:
        NoRoomError: The block would start beyond what a BAT entry can address.
    """
    data = -(-(next_free + target.bitmap_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT
    start = data - target.bitmap_size
    if start // SECTOR >= UNALLOCATED:
        raise NoRoomError(
            f"no room for block {block}: it would start at sector {start // SECTOR}, beyond "
            "the last sector a BAT entry can address"
        )
    return Allocation(block, start // SECTOR, file_size, start, data, data + target.block_size)


# -- the steps ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reserve:
    """Take the room of a new block (in memory: it is never handed out again)."""

    allocation: Allocation


@dataclass(frozen=True, slots=True)
class WriteData:
    """Write guest data at ``offset`` of the file."""

    offset: int
    chunks: Chunks

    @property
    def length(self) -> int:
        """Bytes written."""
        return sum(len(chunk) for chunk in self.chunks)


@dataclass(frozen=True, slots=True)
class WriteFooter:
    """Write the (unchanged) trailing footer at ``offset``, the new end of the data."""

    offset: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class WriteBitmap:
    """Write the bitmap of ``block`` at ``offset``.

    ``cached`` when readers may see it at once (an allocated block), not only once the
    block's BAT entry is written.
    """

    block: int
    offset: int
    bitmap: SectorBitmap
    cached: bool


@dataclass(frozen=True, slots=True)
class PatchBatSector:
    """Read file sector ``sector``, put ``patches`` in, write the sector back whole.

    Each patch is ``(offset within the sector, bytes)``.
    """

    sector: int
    patches: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Commit:
    """The BAT entry of a new block is written: it is part of the image now (in memory)."""

    allocation: Allocation
    bitmap: SectorBitmap


@dataclass(frozen=True, slots=True)
class WriteMeta:
    """Write a metadata structure whole at ``offset``: ``what`` names it for messages."""

    offset: int
    raw: bytes
    what: str


@dataclass(frozen=True, slots=True)
class CopyRange:
    """Copy ``length`` bytes of the file from ``source`` to ``target`` (never overlapping)."""

    source: int
    target: int
    length: int


@dataclass(frozen=True, slots=True)
class Truncate:
    """Cut (or extend) the file to ``size`` bytes."""

    size: int


@dataclass(frozen=True, slots=True)
class Sync:
    """Make everything written so far durable (``fdatasync``)."""


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """A named point where the crash tests may stop the executor (see the table above)."""

    name: str


Step = (
    Reserve
    | WriteData
    | WriteFooter
    | WriteBitmap
    | PatchBatSector
    | Commit
    | WriteMeta
    | CopyRange
    | Truncate
    | Sync
    | CrashPoint
)

SYNC = Sync()


def bat_patches(table_offset: int, entries: Iterable[tuple[int, int]]) -> list[Step]:
    """Whole file sectors of the BAT that set ``(block, entry)`` pairs.

    Sectors of the file, not of the table: the table need not be sector-aligned, and an entry
    may straddle two sectors of a misaligned one.
    """
    patches: dict[int, list[tuple[int, bytes]]] = {}
    for block, entry in entries:
        position = table_offset + 4 * block
        value = encode_entries(array("I", [entry]))
        for byte in range(4):
            sector, within = divmod(position + byte, SECTOR)
            patches.setdefault(sector, []).append((within, value[byte : byte + 1]))
    return [PatchBatSector(sector, tuple(items)) for sector, items in sorted(patches.items())]
