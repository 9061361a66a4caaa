"""A deliberately small, independent VHD writer used to put known data into test images.

It shares no code with vhdfs (plain ``struct``), so a bug in vhdfs's format layer cannot hide
itself by being on both sides of a comparison. It writes whole sectors into fixed, dynamic
and differencing images: new blocks are appended where the trailing footer was (zeroed bitmap,
data a hole), bits are set for exactly the sectors written, and the footer moves to the new end.
"""

from __future__ import annotations

import os
import struct

SECTOR = 512


def _checksum(data: bytes, offset: int) -> int:
    total = sum(data) - sum(data[offset : offset + 4])
    return ~total & 0xFFFFFFFF


class ImageWriter:
    """An image opened for writing sectors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        size = os.fstat(self.fd).st_size
        self.footer = bytearray(os.pread(self.fd, SECTOR, size - SECTOR))
        assert self.footer[:8] == b"conectix", path
        self.footer_pos = size - SECTOR
        self.disk_type = struct.unpack_from(">I", self.footer, 60)[0]
        self.size = struct.unpack_from(">Q", self.footer, 48)[0]
        if self.disk_type == 2:
            return
        data_offset = struct.unpack_from(">Q", self.footer, 16)[0]
        header = os.pread(self.fd, 1024, data_offset)
        assert header[:8] == b"cxsparse"
        self.table_offset, _, self.entries, self.block_size = struct.unpack_from(
            ">QIII", header, 16
        )
        self.spb = self.block_size // SECTOR
        bitmap_bytes = (self.spb + 7) // 8
        self.bitmap_size = (bitmap_bytes + SECTOR - 1) // SECTOR * SECTOR

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, block: int) -> int:
        return struct.unpack(">I", os.pread(self.fd, 4, self.table_offset + 4 * block))[0]

    def _allocate(self, block: int) -> int:
        position = self.footer_pos
        sector = position // SECTOR
        # A zeroed bitmap over the old footer; the data lies past the old end of the file, a
        # hole that reads as zeros until written (cheap for blocks of hundreds of MiB).
        os.pwrite(self.fd, bytes(self.bitmap_size), position)
        self.footer_pos = position + self.bitmap_size + self.block_size
        os.pwrite(self.fd, bytes(self.footer), self.footer_pos)
        os.pwrite(self.fd, struct.pack(">I", sector), self.table_offset + 4 * block)
        return sector

    def write(self, offset: int, data: bytes) -> None:
        """Write whole sectors at a sector-aligned ``offset``."""
        assert offset % SECTOR == 0
        assert len(data) % SECTOR == 0
        assert offset + len(data) <= self.size
        if self.disk_type == 2:
            os.pwrite(self.fd, data, offset)
            return
        pos = 0
        while pos < len(data):
            disk_offset = offset + pos
            block, within = divmod(disk_offset, self.block_size)
            count = min(len(data) - pos, self.block_size - within)
            entry = self._entry(block)
            if entry == 0xFFFFFFFF:
                entry = self._allocate(block)
            base = entry * SECTOR
            os.pwrite(self.fd, data[pos : pos + count], base + self.bitmap_size + within)
            bitmap = bytearray(os.pread(self.fd, self.bitmap_size, base))
            for sector in range(within // SECTOR, (within + count) // SECTOR):
                bitmap[sector // 8] |= 0x80 >> (sector % 8)
            os.pwrite(self.fd, bytes(bitmap), base)
            pos += count


def write_sectors(path: str, offset: int, data: bytes) -> None:
    """Write whole sectors of ``data`` at ``offset`` of the image at ``path``."""
    with ImageWriter(path) as image:
        image.write(offset, data)


def corrupt_footer_checksum(path: str) -> None:
    """Flip one bit of the trailing footer's checksum."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - SECTOR + 64)
        byte = f.read(1)[0]
        f.seek(size - SECTOR + 64)
        f.write(bytes([byte ^ 1]))


def rewrite_footers(path: str, edit: dict[int, bytes]) -> None:
    """Patch bytes of the footer (both copies of a dynamic image) and fix the checksum."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - SECTOR)
        footer = bytearray(f.read(SECTOR))
        for offset, value in edit.items():
            footer[offset : offset + len(value)] = value
        footer[64:68] = struct.pack(">I", _checksum(bytes(footer), 64))
        positions = [size - SECTOR]
        if struct.unpack_from(">I", footer, 60)[0] != 2:
            positions.append(0)
        for position in positions:
            f.seek(position)
            f.write(footer)


def rewrite_header(path: str, edit: dict[int, bytes]) -> None:
    """Patch bytes of the dynamic header at offset 512 and fix its checksum."""
    with open(path, "r+b") as f:
        f.seek(SECTOR)
        header = bytearray(f.read(1024))
        for offset, value in edit.items():
            header[offset : offset + len(value)] = value
        header[36:40] = struct.pack(">I", _checksum(bytes(header), 36))
        f.seek(SECTOR)
        f.write(header)
