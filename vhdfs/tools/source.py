"""What the tools read a disk from: a VHD chain (flattened) or a raw file.

Both offer the same two calls as ``VirtualDisk`` (``read``, ``aclose``) and a ``size``, so a
tool reads any mix of them the same way. ``auto`` takes a file for a VHD if it is one and for
a raw disk otherwise; a file of another known format (qcow2, VMDK, VDI, VHDX) is refused.
"""

from __future__ import annotations

import os

from vhdfs.disk.virtual import DiskOptions, VirtualDisk, open_disk
from vhdfs.errors import NotAVhdError, OtherFormatError, UsageError


class RawSource:
    """A raw file read as a disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(path, f"cannot open: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    async def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        return os.pread(self.fd, length, offset)

    async def aclose(self) -> None:
        """Close the file."""
        os.close(self.fd)


Source = VirtualDisk | RawSource


def open_source(path: str, source_format: str, parents: str | None) -> tuple[Source, str]:
    """Open ``path`` for reading as ``"vhd"``, ``"raw"`` or ``"auto"``; return it and its format.

    Raises:
        OtherFormatError: ``auto`` met a file of another disk format.
        VhdfsError: The VHD (or its chain) cannot be opened.
    """
    if source_format == "raw":
        return RawSource(path), "raw"
    try:
        return open_disk(path, DiskOptions(read_only=True, parents=parents)), "vhd"
    except OtherFormatError:
        raise
    except NotAVhdError:
        if source_format == "vhd":
            raise
        return RawSource(path), "raw"
