"""Carry out structural plans (``vhdfs.image.reshape``) on an image file, step by step.

The offline counterpart of the mount's write-back executor: synchronous (a tool owns its
image, locked, and has nothing else to serve), no cache to keep right (the image is opened
again after a plan). It never reorders or skips a step.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vhdfs import faults
from vhdfs.errors import HostIOError
from vhdfs.format.layout import SECTOR
from vhdfs.image.hostfile import HostFile
from vhdfs.image.steps import (
    CopyRange,
    CrashPoint,
    PatchBatSector,
    Step,
    Sync,
    Truncate,
    WriteFooter,
    WriteMeta,
)

#: Bytes copied per read and write when a plan copies a range.
COPY_CHUNK = 1 << 20

#: Called with the bytes a step moved (copies), for progress reports.
Progress = Callable[[int], None]


def apply(plan: list[Step], file: HostFile, progress: Progress | None = None) -> None:
    """Execute ``plan`` on ``file`` in its order.

    Raises:
        HostIOError: A read, write, truncation or sync failed (the plan stops there; what was
            done is valid by the plan's order, and a rerun plans again from it).
    """
    for step in plan:
        match step:
            case CopyRange(source, target, length):
                _copy(file, source, target, length, progress)
            case WriteMeta(offset, raw, _) | WriteFooter(offset, raw):
                file.pwrite(offset, raw)
            case PatchBatSector(sector, patches):
                data = bytearray(file.pread_exact(sector * SECTOR, SECTOR, "BAT sector"))
                for within, value in patches:
                    data[within : within + len(value)] = value
                file.pwrite(sector * SECTOR, data)
            case Truncate(size):
                try:
                    os.ftruncate(file.fd, size)
                except OSError as exc:
                    raise HostIOError(
                        file.path, f"cannot cut the file to {size} bytes: {exc.strerror}", exc.errno
                    ) from exc
                file.size = size
            case Sync():
                file.fdatasync()
            case CrashPoint(name):
                faults.crash_point(name)
            case _:
                raise AssertionError(f"not a structural step: {step}")


def _copy(file: HostFile, source: int, target: int, length: int, progress: Progress | None) -> None:
    done = 0
    while done < length:
        count = min(COPY_CHUNK, length - done)
        file.pwrite(target + done, file.pread_exact(source + done, count, "block to move"))
        done += count
        if progress is not None:
            progress(count)
