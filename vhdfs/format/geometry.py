"""CHS geometry: the spec's algorithm from size to cylinders/heads/sectors."""

from __future__ import annotations

from dataclasses import dataclass

from vhdfs.format.layout import SECTOR

#: 65535/16/255: the largest geometry, and the sentinel meaning "size is Current size".
MAX_CYLINDERS = 65535
MAX_HEADS = 16
MAX_SECTORS_PER_TRACK = 255


@dataclass(frozen=True, slots=True)
class Geometry:
    """Cylinders, heads and sectors per track as stored in the footer."""

    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def size(self) -> int:
        """Bytes addressed by this geometry (C * H * S * 512)."""
        return self.cylinders * self.heads * self.sectors_per_track * SECTOR

    @property
    def is_max(self) -> bool:
        """True for the 65535/16/255 sentinel that tells readers to trust Current size."""
        return (self.cylinders, self.heads, self.sectors_per_track) == (
            MAX_CYLINDERS,
            MAX_HEADS,
            MAX_SECTORS_PER_TRACK,
        )

    def __str__(self) -> str:
        return f"{self.cylinders}/{self.heads}/{self.sectors_per_track}"


MAX_GEOMETRY = Geometry(MAX_CYLINDERS, MAX_HEADS, MAX_SECTORS_PER_TRACK)


def geometry_for_size(size: int) -> Geometry:
    """CHS geometry for a disk of ``size`` bytes, exactly as the spec's appendix computes it.

    Every peer (QEMU, VirtualBox, blktap) implements the same integer arithmetic, which rounds
    down: the product is usually a little smaller than ``size``.
    """
    total = size // SECTOR
    total = min(total, MAX_CYLINDERS * MAX_HEADS * MAX_SECTORS_PER_TRACK)
    if total >= MAX_CYLINDERS * MAX_HEADS * 63:
        spt, heads = 255, 16
        cyl_x_heads = total // spt
    else:
        spt = 17
        cyl_x_heads = total // spt
        heads = max((cyl_x_heads + 1023) // 1024, 4)
        if cyl_x_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_x_heads = total // spt
        if cyl_x_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_x_heads = total // spt
    return Geometry(cyl_x_heads // heads, heads, spt)


def geometry_to_store(size: int) -> Geometry:
    """The geometry vhdfs writes for a new image of ``size`` bytes.

    When the spec's geometry describes the size exactly, store it. Otherwise store the
    65535/16/255 sentinel (QEMU's ``force_size`` convention): QEMU sizes images with an unknown
    creator by geometry, and only the sentinel makes it use Current size.
    """
    geometry = geometry_for_size(size)
    return geometry if geometry.size == size else MAX_GEOMETRY
