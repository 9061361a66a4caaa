"""MBR and GPT partition tables of a guest disk, read as Linux reads them. Nothing here does I/O.

Partitions get the numbers Linux gives them (block/partitions/msdos.c and efi.c): MBR primary
slots are 1-4 wherever they are used; logical partitions of the extended containers follow
from 5 in the order of their EBR chains; a GPT entry is its index plus one. Extended
containers themselves are not data and are left out. A partition that starts past the end of
the disk is left out, one that runs past it is cut at it (Linux does both, with a warning). A
protective MBR (a slot of type 0xEE) means GPT; a GPT is used only with valid header and entry
CRCs (the backup header at the end of the disk when the primary one is damaged).

The reader (``vhdfs.disk.partitions``) fetches sectors; the functions here only parse them.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

SECTOR = 512
#: MBR partition types that hold logical partitions rather than data.
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
#: Linux's limits: logical partitions followed in one chain, and partitions per disk.
MAX_EBRS = 100
MAX_PARTITIONS = 256
#: A GPT entry array larger than this is not a partition table (Linux allocates it whole).
MAX_GPT_ENTRIES_BYTES = 1 << 20
GPT_ENTRY_SIZE = 128
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")


class Partition(NamedTuple):
    """One partition: its Linux number and its place on the disk, in bytes."""

    number: int
    start: int
    size: int


def _valid_mbr(sector: bytes) -> bool:
    return len(sector) == SECTOR and sector[510:512] == b"\x55\xaa"


def _slots(sector: bytes) -> list[tuple[int, int, int]]:
    """``(type, first sector, sector count)`` of the four slots of an MBR or EBR."""
    out = []
    for slot in range(4):
        entry = sector[446 + 16 * slot : 462 + 16 * slot]
        kind = entry[4]
        first, count = struct.unpack("<II", entry[8:16])
        out.append((kind, first, count))
    return out


class MbrTable(NamedTuple):
    """The primary table of an MBR.

    Its data partitions, its extended containers as (first sector, sector count), and whether
    it only protects a GPT.
    """

    primaries: list[Partition]
    extended: list[tuple[int, int]]
    protective: bool


def parse_mbr(sector: bytes) -> MbrTable | None:
    """The table in sector 0, or ``None`` when it holds none."""
    if not _valid_mbr(sector):
        return None
    if any(sector[446 + 16 * slot] not in (0, 0x80) for slot in range(4)):
        return None  # a boot sector (a file system on the whole disk), not a table
    slots = _slots(sector)
    if any(kind == PROTECTIVE_TYPE for kind, _, _ in slots):
        return MbrTable([], [], True)
    primaries, extended = [], []
    for number, (kind, first, count) in enumerate(slots, 1):
        if kind == 0 or count == 0:
            continue
        if kind in EXTENDED_TYPES:
            extended.append((first, count))
        else:
            primaries.append(Partition(number, first * SECTOR, count * SECTOR))
    return MbrTable(primaries, extended, False)


def parse_ebr(
    sector: bytes, ebr_lba: int, container_lba: int
) -> tuple[list[tuple[int, int]], int | None]:
    """One EBR of a chain: its logical partitions (first sector, count) and the next EBR.

    Logical starts are relative to the EBR itself, the next EBR's to the container (the
    spec's rule, which Linux follows). ``None`` ends the chain.
    """
    if not _valid_mbr(sector):
        return [], None
    logicals: list[tuple[int, int]] = []
    following = None
    for kind, first, count in _slots(sector):
        if kind == 0 or count == 0:
            continue
        if kind in EXTENDED_TYPES:
            if following is None:
                following = container_lba + first
        else:
            logicals.append((ebr_lba + first, count))
    return logicals, following


class GptHeader(NamedTuple):
    """What a GPT header says about where its entries are."""

    this_lba: int
    alternate_lba: int
    entries_lba: int
    entry_count: int
    entries_crc: int

    @property
    def entries_bytes(self) -> int:
        """Size of the entry array."""
        return self.entry_count * GPT_ENTRY_SIZE


def parse_gpt_header(sector: bytes, lba: int) -> GptHeader | None:
    """The GPT header read at ``lba``, or ``None`` if it is not a valid one."""
    if len(sector) < _GPT_HEADER.size:
        return None
    fields = _GPT_HEADER.unpack_from(sector)
    signature, _revision, header_size, crc, _reserved, this_lba, alternate = fields[:7]
    entries_lba, count, entry_size, entries_crc = fields[10:]
    if signature != b"EFI PART" or not 92 <= header_size <= SECTOR or this_lba != lba:
        return None
    zeroed = sector[:16] + b"\0\0\0\0" + sector[20:header_size]
    if zlib.crc32(zeroed) != crc or entry_size != GPT_ENTRY_SIZE:
        return None
    if count * GPT_ENTRY_SIZE > MAX_GPT_ENTRIES_BYTES:
        return None
    return GptHeader(this_lba, alternate, entries_lba, count, entries_crc)


def parse_gpt_entries(raw: bytes, header: GptHeader, disk_sectors: int) -> list[Partition] | None:
    """The partitions of a GPT entry array, or ``None`` if its CRC does not match."""
    if len(raw) != header.entries_bytes or zlib.crc32(raw) != header.entries_crc:
        return None
    last_lba = disk_sectors - 1
    partitions = []
    for index in range(min(header.entry_count, MAX_PARTITIONS)):
        entry = raw[index * GPT_ENTRY_SIZE : (index + 1) * GPT_ENTRY_SIZE]
        first, last = struct.unpack_from("<QQ", entry, 32)
        if entry[:16] == bytes(16) or first > last_lba or last > last_lba or first > last:
            continue  # unused, or not on this disk (Linux's is_pte_valid)
        partitions.append(Partition(index + 1, first * SECTOR, (last - first + 1) * SECTOR))
    return partitions


def clip(partition: Partition, disk_size: int) -> Partition | None:
    """Apply Linux's rule at the end of the disk.

    A partition that starts past it is dropped, one that runs past it is cut at it.
    """
    if partition.start >= disk_size or partition.size <= 0:
        return None
    return partition._replace(size=min(partition.size, disk_size - partition.start))
