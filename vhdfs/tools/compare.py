"""``vhd compare``: do two disks present the same bytes? Any mix of VHD chains and raw files.

Like ``cmp`` and ``qemu-img compare -s``: the disks must have the same size and the same bytes
at every offset; the first difference is reported by its offset on the disk. Each disk is read
as a mount would serve it (a chain flattened), in steps of ``CHUNK``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vhdfs.errors import HostIOError
from vhdfs.tools.source import Source, open_source

#: Bytes compared per step, and within a step that differs, per piece searched.
CHUNK = 4 << 20
PIECE = 4096

#: ``progress(bytes done, bytes in all)``.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class CompareReport:
    """What ``compare`` found."""

    first: str
    second: str
    first_size: int
    second_size: int
    #: Offset of the first byte that differs (``None``: none differs, or the sizes differ).
    first_difference: int | None

    @property
    def identical(self) -> bool:
        """Same size and the same bytes."""
        return self.first_size == self.second_size and self.first_difference is None


async def compare(
    first: str,
    second: str,
    *,
    formats: tuple[str, str] = ("auto", "auto"),
    parents: str | None = None,
    progress: Progress | None = None,
) -> CompareReport:
    """Compare the disks of ``first`` and ``second`` byte for byte.

    Raises:
        VhdfsError: A disk cannot be opened or read.
    """
    a, _ = open_source(first, formats[0], parents)
    try:
        b, _ = open_source(second, formats[1], parents)
        try:
            difference = None
            if a.size == b.size:
                difference = await _first_difference(a, b, (first, second), progress)
            return CompareReport(first, second, a.size, b.size, difference)
        finally:
            await b.aclose()
    finally:
        await a.aclose()


async def _first_difference(
    a: Source, b: Source, names: tuple[str, str], progress: Progress | None
) -> int | None:
    size = a.size
    offset = 0
    while offset < size:
        length = min(CHUNK, size - offset)
        left = await _read_exact(a, names[0], offset, length)
        right = await _read_exact(b, names[1], offset, length)
        if left != right:
            return offset + _first_unequal(left, right)
        offset += length
        if progress is not None:
            progress(offset, size)
    return None


def _first_unequal(left: bytes, right: bytes) -> int:
    """Index of the first byte that differs in two unequal strings of one length."""
    view_l, view_r = memoryview(left), memoryview(right)
    for piece in range(0, len(left), PIECE):
        if view_l[piece : piece + PIECE] != view_r[piece : piece + PIECE]:
            end = min(piece + PIECE, len(left))
            return next(i for i in range(piece, end) if left[i] != right[i])
    raise ValueError("the strings are equal")


async def _read_exact(source: Source, path: str, offset: int, length: int) -> bytes:
    data = await source.read(offset, length)
    if len(data) != length:
        raise HostIOError(path, f"short read at offset {offset}: {len(data)} of {length} bytes")
    return bytes(data)
