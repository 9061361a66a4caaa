"""Hand-crafted dynamic and differencing images with unusual but legal layouts.

The spec fixes no order of the header, the BAT, locator data and blocks. ``craft`` writes an
image whose structures follow a given order, with plain ``struct`` (no vhdfs code), so tests
can check that vhdfs, qemu-img and vhdimount all read what was meant.

A layout is a list of items, placed one after another from offset 512 (the footer copy is
always at 0 and the footer always last): ``"header"``, ``"bat"``, ``"locators"``,
``("block", n)`` for block *n*, and ``("gap", bytes)`` for unused space.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

SECTOR = 512
Item = str | tuple[str, int]


def _checksum(data: bytes | bytearray, offset: int) -> int:
    total = sum(data) - sum(data[offset : offset + 4])
    return ~total & 0xFFFFFFFF


@dataclass
class Parent:
    """What a crafted child records of its parent."""

    unique_id: bytes
    name: str
    #: ``(platform code, payload)`` locators, in slot order.
    locators: list[tuple[bytes, bytes]] = field(default_factory=list)


def unique_id_of(path: str | os.PathLike[str]) -> bytes:
    """The unique id in the trailing footer of the image at ``path``."""
    with open(path, "rb") as f:
        f.seek(-SECTOR, os.SEEK_END)
        return f.read(SECTOR)[68:84]


def craft(
    path: str | os.PathLike[str],
    *,
    size: int,
    block_size: int,
    layout: Sequence[Item],
    data: dict[int, bytes],
    bitmaps: dict[int, bytes] | None = None,
    parent: Parent | None = None,
    align_data: bool = False,
) -> None:
    """Write an image laid out as ``layout``.

    Args:
        size: Virtual size (a multiple of 512).
        block_size: Block size.
        layout: Order of the structures (see the module docstring).
        data: Contents of each allocated block (``block_size`` bytes).
        bitmaps: Sector bitmaps by block; all sectors present by default.
        parent: Makes a differencing image with this parent.
        align_data: Place each block so that its data starts on a 4 KiB boundary.
    """
    bitmaps = bitmaps or {}
    spb = block_size // SECTOR
    bitmap_used = -(-spb // 8)
    bitmap_size = -(-bitmap_used // SECTOR) * SECTOR
    entries = -(-size // block_size)
    bat_size = -(-entries * 4 // SECTOR) * SECTOR
    payloads = [] if parent is None else parent.locators
    pieces: list[tuple[int, bytes]] = []
    positions: dict[str, int] = {}
    bat = [0xFFFFFFFF] * entries
    locator_entries: list[tuple[bytes, int, int, int]] = []
    position = SECTOR
    for item in layout:
        if item == "header":
            positions["header"] = position
            position += 1024
        elif item == "bat":
            positions["bat"] = position
            position += bat_size
        elif item == "locators":
            for code, payload in payloads:
                space = -(-len(payload) // SECTOR) * SECTOR
                locator_entries.append((code, space, len(payload), position))
                pieces.append((position, payload))
                position += space
        elif item[0] == "gap":
            position += int(item[1])
        elif item[0] == "block":
            block = int(item[1])
            if align_data:
                position = -(-(position + bitmap_size) // 4096) * 4096 - bitmap_size
            bat[block] = position // SECTOR
            bitmap = bitmaps.get(block, b"\xff" * bitmap_used)
            pieces.append((position, bitmap.ljust(bitmap_size, b"\0")))
            pieces.append((position + bitmap_size, data[block]))
            position += bitmap_size + block_size
        else:
            raise ValueError(f"unknown layout item {item!r}")
    footer = _footer(size, parent is not None, positions["header"])
    header = _header(positions["bat"], entries, block_size, parent, locator_entries)
    pieces += [
        (0, footer),
        (positions["header"], header),
        (positions["bat"], b"".join(struct.pack(">I", e) for e in bat).ljust(bat_size, b"\xff")),
        (position, footer),
    ]
    with open(path, "wb") as f:
        f.truncate(position + SECTOR)
        for offset, piece in pieces:
            f.seek(offset)
            f.write(piece)


def _footer(size: int, differencing: bool, header_offset: int) -> bytes:
    footer = bytearray(SECTOR)
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQ", footer, 8, 2, 0x00010000, header_offset)
    struct.pack_into(">I4sI4sQQ", footer, 24, 0, b"test", 0x00010000, b"Wi2k", size, size)
    struct.pack_into(">HBBI", footer, 56, 65535, 16, 255, 4 if differencing else 3)
    footer[68:84] = uuid.uuid4().bytes
    struct.pack_into(">I", footer, 64, _checksum(footer, 64))
    return bytes(footer)


def _header(
    table_offset: int,
    entries: int,
    block_size: int,
    parent: Parent | None,
    locators: list[tuple[bytes, int, int, int]],
) -> bytes:
    header = bytearray(1024)
    header[0:8] = b"cxsparse"
    struct.pack_into(
        ">QQIII", header, 8, 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, entries, block_size
    )
    if parent is not None:
        header[40:56] = parent.unique_id
        name = parent.name.encode("utf-16-be")
        header[64 : 64 + len(name)] = name
    for slot, (code, space, length, offset) in enumerate(locators):
        struct.pack_into(">4sIIIQ", header, 576 + 24 * slot, code, space, length, 0, offset)
    struct.pack_into(">I", header, 36, _checksum(header, 36))
    return bytes(header)


def craft_sparse(
    path: str | os.PathLike[str],
    *,
    size: int,
    block_size: int,
    table: Sequence[int] = (),
    data_bytes: int = 0,
) -> int:
    """Write a dynamic image whose BAT and data are left holes where not given.

    The footer copy is at 0, the header at 512, the BAT right after it, then ``data_bytes`` of
    data area and the footer. Only ``table`` is written, as the first BAT entries: the rest of
    the table reads as entries of 0 (not 0xFFFFFFFF, unallocated), and every block as zeros,
    so the file takes a few KiB on disk whatever it claims. Returns the first sector of the
    data area.

    Args:
        size: Virtual size claimed by the footer; the BAT has just enough entries for it.
        block_size: Block size claimed by the header.
        table: The first BAT entries (sector numbers, or 0xFFFFFFFF).
        data_bytes: Bytes between the BAT's last sector and the footer.
    """
    entries = -(-size // block_size)
    bat_offset = 3 * SECTOR
    data_offset = bat_offset + -(-entries * 4 // SECTOR) * SECTOR
    footer_offset = data_offset + data_bytes
    footer = _footer(size, False, SECTOR)
    with open(path, "wb") as f:
        f.truncate(footer_offset + SECTOR)
        f.write(footer)
        f.write(_header(bat_offset, entries, block_size, None, []))
        f.write(struct.pack(f">{len(table)}I", *table))
        f.seek(footer_offset)
        f.write(footer)
    return data_offset // SECTOR
