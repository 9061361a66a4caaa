"""The partitions of a virtual disk, as files: read from the disk's current contents.

``PartitionTable.current`` reads the MBR (and the EBR chains of extended containers) or the
GPT through the disk itself, dirty data included, and parses them with
``vhdfs.format.partition_table``. It reads them again whenever the disk has been written since,
so the partitions follow a table rewritten through the mount.
"""

from __future__ import annotations

from vhdfs.disk.virtual import VirtualDisk
from vhdfs.format.partition_table import (
    MAX_EBRS,
    MAX_PARTITIONS,
    SECTOR,
    Partition,
    clip,
    parse_ebr,
    parse_gpt_entries,
    parse_gpt_header,
    parse_mbr,
)


class PartitionTable:
    """The partition table of ``disk``, kept current."""

    def __init__(self, disk: VirtualDisk) -> None:
        self.disk = disk
        self._generation = -1
        self._partitions: list[Partition] = []

    async def current(self) -> list[Partition]:
        """The partitions now, in number order."""
        generation = self.disk.write_generation
        if generation != self._generation:
            self._partitions = await self._read()
            self._generation = generation
        return self._partitions

    async def _sector(self, lba: int) -> bytes:
        return bytes(await self.disk.read(lba * SECTOR, SECTOR))

    async def _read(self) -> list[Partition]:
        size = self.disk.size
        table = parse_mbr(await self._sector(0)) if size >= SECTOR else None
        if table is None:
            return []
        if table.protective:
            found = await self._gpt()
        else:
            found = list(table.primaries)
            number = 5
            for first, _ in table.extended:
                for logical in await self._chain(first):
                    found.append(Partition(number, logical[0] * SECTOR, logical[1] * SECTOR))
                    number += 1
        clipped = (clip(partition, size) for partition in found[:MAX_PARTITIONS])
        return [partition for partition in clipped if partition is not None]

    async def _chain(self, container: int) -> list[tuple[int, int]]:
        """Logical partitions of the extended container starting at sector ``container``."""
        logicals: list[tuple[int, int]] = []
        ebr: int | None = container
        seen: set[int] = set()
        while ebr is not None and ebr not in seen and len(seen) < MAX_EBRS:
            seen.add(ebr)
            if (ebr + 1) * SECTOR > self.disk.size:
                break
            found, ebr = parse_ebr(await self._sector(ebr), ebr, container)
            logicals += found
        return logicals

    async def _gpt(self) -> list[Partition]:
        sectors = self.disk.size // SECTOR
        for lba in (1, sectors - 1):
            header = parse_gpt_header(await self._sector(lba), lba)
            if (
                header is None
                or (header.entries_lba * SECTOR + header.entries_bytes) > self.disk.size
            ):
                continue
            raw = bytes(await self.disk.read(header.entries_lba * SECTOR, header.entries_bytes))
            partitions = parse_gpt_entries(raw, header, sectors)
            if partitions is not None:
                return partitions
        return []
