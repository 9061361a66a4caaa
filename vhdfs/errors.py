"""The one exception hierarchy for problems with images, chains, mounts and options.

Every error renders as a single line that names the file and, where there is one, the field
(non-printable characters escaped, see ``vhdfs.text``):
``disk.vhd: footer checksum 0x00001234 does not match computed 0x0000abcd``. Each class carries
the errno the FUSE layer answers with and the exit status the command-line tools return, so the
mapping lives in one place (see ``ExitCode``).
"""

from __future__ import annotations

import errno as _errno
import os
from enum import IntEnum
from typing import NamedTuple

from vhdfs.text import printable


class ExitCode(IntEnum):
    """Exit statuses of ``vhdfs`` and ``vhd``; scripts may rely on them."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    BAD_IMAGE = 3
    BAD_CHAIN = 4
    MOUNT_FAILED = 5
    BUSY = 6
    IO_ERROR = 7


class VhdfsError(Exception):
    """Base of every error vhdfs reports to a user.

    Args:
        path: The file the problem is about (an image, a mountpoint), or ``None``.
        message: What is wrong, as one line without the path.
    """

    errno: int = _errno.EIO
    exit_code: ExitCode = ExitCode.FAILURE
    #: A stable name of the kind of problem, for ``--json`` output.
    code = "error"

    def __init__(self, path: str | os.PathLike[str] | None, message: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message if self.path is None else f"{self.path}: {self.message}"
        # Paths and locator text come from outside: one line, nothing a terminal obeys.
        return printable(text)


class UsageError(VhdfsError):
    """A command-line argument or ``-o`` option is invalid."""

    code = "usage"
    errno = _errno.EINVAL
    exit_code = ExitCode.USAGE


class ImageError(VhdfsError):
    """The image file cannot be used as it is."""

    code = "image-unusable"
    exit_code = ExitCode.BAD_IMAGE


class ImageAccessError(ImageError):
    """The image file cannot be opened at all (missing, permissions, not a regular file)."""

    code = "cannot-open"


class NotAVhdError(ImageError):
    """The file is not a VHD at all (no ``conectix`` footer anywhere)."""

    code = "not-a-vhd"


class OtherFormatError(NotAVhdError):
    """The file is a disk image of another format (qcow2, VMDK, VDI, VHDX)."""

    code = "other-format"


class FormatError(ImageError):
    """A field of a VHD structure holds a value the format does not allow."""

    code = "bad-field"


class ChecksumError(FormatError):
    """A footer or dynamic header checksum does not match its contents."""

    code = "bad-checksum"


class TruncatedImageError(ImageError):
    """The file ends before the data its metadata describes."""

    code = "truncated"


class CorruptMetadataError(ImageError):
    """Metadata contradicts itself or the file (e.g. a BAT entry past the end of file)."""

    code = "corrupt-metadata"


class UnsupportedImageError(ImageError):
    """A valid image using a feature vhdfs does not handle (VHDX, encryption, raw parents)."""

    code = "unsupported"
    errno = _errno.EOPNOTSUPP


class ChainError(VhdfsError):
    """A differencing chain cannot be assembled."""

    code = "chain-broken"
    exit_code = ExitCode.BAD_CHAIN


class ParentNotFoundError(ChainError):
    """No candidate path holds the parent; the message lists every path looked at."""

    code = "parent-not-found"


class ParentIdMismatchError(ChainError):
    """A file exists where the locators point, but its unique id is not the expected one."""

    code = "parent-id-mismatch"


class ChainLoopError(ChainError):
    """The chain refers back to an image already in it (or is deeper than allowed)."""

    code = "chain-loop"


class ImageBusyError(VhdfsError):
    """Another program holds a conflicting lock on the image."""

    code = "in-use"
    errno = _errno.EBUSY
    exit_code = ExitCode.BUSY


class ReadOnlyError(VhdfsError):
    """A write was attempted on an image opened read-only."""

    code = "read-only"
    errno = _errno.EROFS


class HostIOError(VhdfsError):
    """A read, write or sync of the host file failed.

    ``errno`` is the host's own (ENOSPC stays ENOSPC for the guest), EIO when there is none.
    """

    code = "host-io"
    exit_code = ExitCode.IO_ERROR

    def __init__(
        self, path: str | os.PathLike[str] | None, message: str, errno: int | None = None
    ) -> None:
        if errno is not None:
            self.errno = errno
        super().__init__(path, message)


class StalledPathError(HostIOError):
    """A file's lookup or open got no answer in time (a stopped FUSE daemon, a dead server)."""

    code = "no-answer"
    errno = _errno.ETIMEDOUT


class NoSpaceError(VhdfsError):
    """A write beyond the end of the virtual disk, or no room left for a new block."""

    code = "no-space"
    errno = _errno.ENOSPC


class Notice(NamedTuple):
    """A problem that does not stop an image from being used: a stable code and one line."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class MountError(VhdfsError):
    """The file system could not be mounted (mountpoint, FUSE, daemon start)."""

    code = "mount-failed"
    exit_code = ExitCode.MOUNT_FAILED
