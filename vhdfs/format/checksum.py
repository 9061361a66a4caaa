"""The one's-complement byte-sum checksum of the footer and the dynamic header."""

from __future__ import annotations


def vhd_checksum(data: bytes, checksum_offset: int) -> int:
    """Return the checksum of ``data`` with its 4-byte checksum field counted as zero.

    Args:
        data: The whole structure (512-byte footer or 1024-byte dynamic header).
        checksum_offset: Where the checksum field sits inside ``data``.
    """
    total = sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def with_checksum(data: bytes, checksum_offset: int) -> bytes:
    """Return ``data`` with its checksum field filled in."""
    value = vhd_checksum(data, checksum_offset)
    return data[:checksum_offset] + value.to_bytes(4, "big") + data[checksum_offset + 4 :]
