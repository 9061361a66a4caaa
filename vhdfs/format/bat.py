"""Block Allocation Table pages: big-endian u32 sector numbers <-> ``array('I')``.

The BAT is handled in pages of ``BAT_PAGE_ENTRIES`` entries so that a 2 TiB image never needs
its whole 4 MiB table in memory; pages go through the block cache like any other metadata.
"""

from __future__ import annotations

import sys
from array import array

from vhdfs.format.layout import SECTOR, UNALLOCATED

#: Entries per BAT cache page: 4 KiB of table, i.e. 2 GiB of disk with 2 MiB blocks.
BAT_PAGE_ENTRIES = 1024
BAT_PAGE_BYTES = BAT_PAGE_ENTRIES * 4
_SWAP = sys.byteorder == "little"

assert array("I").itemsize == 4


def decode_entries(raw: bytes) -> array[int]:
    """Turn big-endian BAT bytes into an array of entries (sector numbers or UNALLOCATED)."""
    entries = array("I")
    entries.frombytes(raw[: len(raw) - len(raw) % 4])
    if _SWAP:
        entries.byteswap()
    return entries


def encode_entries(entries: array[int]) -> bytes:
    """Turn an array of entries back into big-endian BAT bytes."""
    out = array("I", entries)
    if _SWAP:
        out.byteswap()
    return out.tobytes()


def table_bytes(entry_count: int) -> int:
    """On-disk size of a BAT with ``entry_count`` entries: padded to whole sectors."""
    return -(-entry_count * 4 // SECTOR) * SECTOR


def empty_table(entry_count: int) -> bytes:
    """A BAT with every entry unallocated, padding included (0xFF, as QEMU writes it)."""
    return b"\xff" * table_bytes(entry_count)


__all__ = [
    "BAT_PAGE_BYTES",
    "BAT_PAGE_ENTRIES",
    "UNALLOCATED",
    "decode_entries",
    "empty_table",
    "encode_entries",
    "table_bytes",
]
