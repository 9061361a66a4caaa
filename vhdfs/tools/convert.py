"""``vhd convert``: a VHD (its whole chain, flattened) or a raw file into a new VHD or raw file.

Sparse both ways: ranges that read as zeros are neither allocated in a dynamic VHD nor
written in a fixed VHD or a raw file (those are created sparse). The output is built under a
temporary name beside the destination and linked into place only when it is complete and
synced, so the destination never exists half-written and is never overwritten; a failed run
removes its partial file (a killed one leaves ``.NAME.vhdfs-partial``, removed by the next run).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from vhdfs.disk.virtual import DiskOptions, VirtualDisk, open_disk
from vhdfs.errors import HostIOError, UsageError
from vhdfs.format.layout import SECTOR
from vhdfs.image.create import DEFAULT_BLOCK_SIZE, create_dynamic, create_fixed
from vhdfs.tools.source import Source, open_source

#: Bytes read per step, and the granularity of what is skipped as zeros within it.
CHUNK = 2 << 20
PIECE = 64 << 10
MiB = 1 << 20
_ZEROS = bytes(CHUNK)

#: ``progress(bytes done, bytes in all)``.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ConvertRequest:
    """What to convert into what."""

    source: str
    destination: str
    #: ``"auto"`` (a VHD if it is one, else raw), ``"vhd"`` or ``"raw"``.
    source_format: str = "auto"
    #: ``"vhd"`` or ``"raw"``.
    output: str = "vhd"
    #: ``"dynamic"`` or ``"fixed"`` (VHD output).
    kind: str = "dynamic"
    block_size: int = DEFAULT_BLOCK_SIZE
    #: A fixed VHD whose size is rounded up to a whole MiB, as Azure requires.
    azure: bool = False
    #: Open only parents of SRC whose real path lies inside this folder.
    parents: str | None = None


@dataclass(frozen=True, slots=True)
class ConvertReport:
    """What ``convert`` did."""

    source: str
    source_format: str
    destination: str
    output: str
    kind: str | None
    virtual_size: int
    #: Bytes of data written (ranges that were not all zeros).
    data_bytes: int


def _partial_name(destination: str) -> str:
    folder, name = os.path.split(os.path.abspath(destination))
    return os.path.join(folder, f".{name}.vhdfs-partial")


async def convert(request: ConvertRequest, progress: Progress | None = None) -> ConvertReport:
    """Convert ``request.source`` into ``request.destination``.

    Raises:
        UsageError: The destination exists, or the request does not fit the source.
        VhdfsError: The source cannot be read, or the destination cannot be written.
    """
    if os.path.lexists(request.destination):
        raise UsageError(request.destination, "already exists; refusing to overwrite it")
    source, source_format = open_source(request.source, request.source_format, request.parents)
    try:
        size = source.size
        if request.output == "vhd":
            size = -(-size // SECTOR) * SECTOR
            if request.azure:
                size = -(-size // MiB) * MiB
        partial = _partial_name(request.destination)
        if os.path.lexists(partial):
            os.unlink(partial)  # left by a killed run; never the destination itself
        try:
            written = await _write(request, source, size, partial, progress)
            _link_into_place(partial, request.destination)
        finally:
            if os.path.lexists(partial):
                os.unlink(partial)
    finally:
        await source.aclose()
    kind = ("fixed" if request.azure else request.kind) if request.output == "vhd" else None
    return ConvertReport(
        request.source, source_format, request.destination, request.output, kind, size, written
    )


async def _write(
    request: ConvertRequest,
    source: Source,
    size: int,
    partial: str,
    progress: Progress | None,
) -> int:
    """Copy every range that is not all zeros into a new file at ``partial``."""
    target: VirtualDisk | _RawTarget
    if request.output == "raw":
        target = _RawTarget(partial, size)
    else:
        if request.azure or request.kind == "fixed":
            create_fixed(partial, size)
        else:
            create_dynamic(partial, size, request.block_size)
        # Offline: written data reaches the file as the copy goes (no flusher task runs in a
        # tool), whatever the block size; the flush at the end makes it durable.
        target = open_disk(partial, DiskOptions(explicit_rw=True, offline=True))
    written = 0
    try:
        for offset in range(0, min(size, source.size), CHUNK):
            data = await source.read(offset, CHUNK)
            if data != _ZEROS[: len(data)]:
                for start, piece in _data_pieces(memoryview(data)):
                    await target.write(offset + start, piece)
                    written += len(piece)
            if progress is not None:
                progress(offset + len(data), size)
            await trio.lowlevel.checkpoint()
        await target.flush(durable=True)
    finally:
        await target.aclose()
    return written


def _data_pieces(data: memoryview) -> list[tuple[int, memoryview]]:
    """The runs of ``data`` that are not all zeros, in ``PIECE``-sized steps.

    A new file reads as zeros wherever nothing is written.
    """
    runs: list[tuple[int, memoryview]] = []
    start = None
    for position in range(0, len(data), PIECE):
        zero = data[position : position + PIECE] == _ZEROS[: min(PIECE, len(data) - position)]
        if not zero and start is None:
            start = position
        elif zero and start is not None:
            runs.append((start, data[start:position]))
            start = None
    if start is not None:
        runs.append((start, data[start:]))
    return runs


class _RawTarget:
    """A new raw file, written sparse: only what is not zeros is written."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.ftruncate(self.fd, size)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        try:
            return os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise HostIOError(
                self.path, f"write at {offset} failed: {exc.strerror}", exc.errno
            ) from exc

    async def flush(self, *, durable: bool) -> None:
        os.fsync(self.fd)

    async def aclose(self) -> None:
        os.close(self.fd)


def _link_into_place(partial: str, destination: str) -> None:
    """Give the finished file its name, never over an existing one, durably."""
    try:
        os.link(partial, destination)
    except FileExistsError:
        raise UsageError(destination, "already exists; refusing to overwrite it") from None
    folder = os.open(os.path.dirname(os.path.abspath(destination)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.unlink(partial)
        os.fsync(folder)
    finally:
        os.close(folder)
