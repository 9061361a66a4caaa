"""``-o`` options: vhdfs's own keys, FUSE/kernel flags passed through, fstab words ignored.

Everything is validated here, before ``pyfuse3.init``: libfuse answers an unknown option with a
message of its own and a generic exception, and some options it accepts kill the session at the
kernel handshake (``max_read=``), so only the set below is ever passed on.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field, replace

from vhdfs.cache.block_cache import MIN_CACHE_SIZE
from vhdfs.disk.hostio import IoMode
from vhdfs.disk.virtual import DiskOptions
from vhdfs.errors import UsageError
from vhdfs.fuse.operations import Ownership
from vhdfs.units import format_size, parse_size

#: Smallest ``dirty_limit``: one maximal FUSE write must fit.
MIN_DIRTY_LIMIT = 1 << 20

#: Flags libfuse 3.14 accepts and hands to the kernel or the session unchanged.
PASS_THROUGH_FLAGS = frozenset(
    {
        "allow_other",
        "allow_root",
        "auto_unmount",
        "default_permissions",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
    }
)
#: Words mount(8), mount.fuse3 and fstab may hand over that mean nothing for a raw disk file,
#: accepted and dropped: access-time and directory variants (there are no directories to
#: write and no access times to keep), user-space mount words, and mount(8)'s own flags.
IGNORED_FLAGS = frozenset(
    {
        "defaults",
        "async",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "nousers",
        "owner",
        "noowner",
        "group",
        "nogroup",
        "_netdev",
        "nofail",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "diratime",
        "nodiratime",
        "dirsync",
        "iversion",
        "noiversion",
        "mand",
        "nomand",
        "symfollow",
        "nosymfollow",
        "silent",
        "loud",
        "seclabel",
    }
)
#: Keys whose values mean nothing here (``comment=``, mount(8)'s helpers, the fstab ``user=``).
IGNORED_KEYS = frozenset({"comment", "helper", "uhelper", "user"})
#: Security-label keys libfuse hands to the kernel.
PASS_THROUGH_KEYS = frozenset({"context", "fscontext", "defcontext", "rootcontext"})


@dataclass
class MountOptions:
    """What the ``-o`` options asked for: how to open each disk, and how to mount."""

    disk: DiskOptions = field(default_factory=DiskOptions)
    ownership: Ownership = field(default_factory=Ownership)
    overlay: str | None = None
    pidfile: str | None = None
    #: ``partitions``: a file per partition beside each raw file.
    partitions: bool = False
    fsname: str | None = None
    subtype: str | None = None
    fuse_flags: list[str] = field(default_factory=list)


def split_options(text: str) -> list[str]:
    r"""Split one ``-o`` argument at commas, as libfuse does.

    A backslash escapes the next character, so ``fsname=a\,b`` is one option.
    """
    items, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_mount_options(groups: list[str]) -> MountOptions:
    """Parse the arguments of every ``-o`` (each a comma-separated list).

    Raises:
        UsageError: An unknown option or a bad value, named in the message.
    """
    options = MountOptions()
    for group in groups:
        for item in split_options(group):
            _apply(options, item)
    return options


def _apply(options: MountOptions, item: str) -> None:
    key, has_value, value = item.partition("=")
    if key.lower().startswith("x-") or key in IGNORED_FLAGS or key in IGNORED_KEYS:
        return
    if has_value:
        _apply_value(options, key, value)
    elif key == "ro":
        options.disk.read_only = True
        options.disk.explicit_rw = False
    elif key == "rw":
        options.disk.read_only = False
        options.disk.explicit_rw = True
    elif key == "sync":
        options.disk.writeback = 0.0
    elif key == "partitions":
        options.partitions = True
    elif key in PASS_THROUGH_FLAGS:
        if key not in options.fuse_flags:
            options.fuse_flags.append(key)
    else:
        raise UsageError(None, f"unknown mount option '{key}' (see vhdfs --help)")


def _apply_value(options: MountOptions, key: str, value: str) -> None:
    if key == "cache_size":
        options.disk.cache_size = _size_value(key, value, MIN_CACHE_SIZE)
    elif key == "dirty_limit":
        options.disk.dirty_limit = _size_value(key, value, MIN_DIRTY_LIMIT)
    elif key == "writeback":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 86400:
            raise UsageError(None, f"writeback={value}: expected seconds from 0 to 86400")
        options.disk.writeback = seconds
    elif key == "pidfile":
        if not value:
            raise UsageError(None, "pidfile= needs a path")
        options.pidfile = value
    elif key == "overlay":
        if not value:
            raise UsageError(None, "overlay= needs the path of the overlay image")
        options.overlay = value
    elif key == "parents":
        if not value:
            raise UsageError(None, "parents= needs the folder parents must lie in")
        options.disk.parents = os.path.abspath(value)
    elif key == "io":
        try:
            options.disk.io_mode = IoMode(value)
        except ValueError:
            choices = ", ".join(m.value for m in IoMode)
            raise UsageError(None, f"io={value}: expected one of {choices}") from None
    elif key in ("uid", "gid", "umask"):
        options.ownership = replace(options.ownership, **{key: _id_value(key, value)})
    elif key == "fsname":
        options.fsname = value
    elif key == "subtype":
        options.subtype = value
    elif key in PASS_THROUGH_KEYS:
        options.fuse_flags.append(f"{key}={value}")
    else:
        raise UsageError(None, f"unknown mount option '{key}={value}' (see vhdfs --help)")


def _id_value(key: str, value: str) -> int:
    """A uid (number or user name), gid (number or group name) or octal umask."""
    if key == "umask":
        try:
            mask = int(value, 8)
        except ValueError:
            mask = -1
        if not 0 <= mask <= 0o777:
            raise UsageError(None, f"umask={value}: expected an octal mask from 000 to 777")
        return mask
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if key == "uid" else grp.getgrnam(value).gr_gid
    except KeyError:
        what = "user" if key == "uid" else "group"
        raise UsageError(None, f"{key}={value}: no such {what}") from None


def _size_value(key: str, value: str, minimum: int) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise UsageError(None, f"{key}: {exc}") from None
    if size < minimum:
        raise UsageError(None, f"{key} {value} is below the minimum {format_size(minimum)}")
    return size


class FuseBytes(str):
    """An option string that reaches libfuse as file-system bytes.

    pyfuse3 encodes every option with ``str.encode("us-ascii")``, so a path with non-ASCII
    characters (an image named ``Kind-ü.vhd``) could not become the ``fsname``; this string
    encodes itself as the file system's bytes instead, whatever encoding is asked for.
    """

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """The bytes of the path this string holds (``os.fsencode``)."""
        return os.fsencode(str(self))


def escape_fuse_value(text: str) -> str:
    r"""Escape a value for libfuse's option parser: a backslash before ``\`` and ``,``."""
    return text.replace("\\", "\\\\").replace(",", "\\,")
