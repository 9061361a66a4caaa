"""``-o`` options: vhdfs's own keys, FUSE/kernel flags passed through, fstab words ignored.

Everything is validated here, before ``pyfuse3.init``: libfuse answers an unknown option with a
message of its own and a generic exception, and some options it accepts kill the session at the
kernel handshake (``max_read=``), so only the set below is ever passed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vhdfs.cache.block_cache import MIN_CACHE_SIZE
from vhdfs.disk.hostio import IoMode
from vhdfs.disk.virtual import DiskOptions
from vhdfs.errors import UsageError
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
#: Words mount(8) and fstab use that mean nothing here; the access-time variants libfuse
#: refuses are accepted too (a raw disk file keeps no access times anyway).
IGNORED_FLAGS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "owner",
        "_netdev",
        "nofail",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "diratime",
        "nodiratime",
    }
)


@dataclass
class MountOptions:
    """What the ``-o`` options asked for: how to open each disk, and how to mount."""

    disk: DiskOptions = field(default_factory=DiskOptions)
    overlay: str | None = None
    pidfile: str | None = None
    fsname: str | None = None
    subtype: str | None = None
    fuse_flags: list[str] = field(default_factory=list)


def parse_mount_options(groups: list[str]) -> MountOptions:
    """Parse the arguments of every ``-o`` (each a comma-separated list).

    Raises:
        UsageError: An unknown option or a bad value, named in the message.
    """
    options = MountOptions()
    for group in groups:
        for item in group.split(","):
            item = item.strip()
            if item:
                _apply(options, item)
    return options


def _apply(options: MountOptions, item: str) -> None:
    key, has_value, value = item.partition("=")
    if key.startswith("x-") or key == "comment" or key in IGNORED_FLAGS:
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
    elif key == "io":
        try:
            options.disk.io_mode = IoMode(value)
        except ValueError:
            choices = ", ".join(m.value for m in IoMode)
            raise UsageError(None, f"io={value}: expected one of {choices}") from None
    elif key == "fsname":
        options.fsname = value
    elif key == "subtype":
        options.subtype = value
    else:
        raise UsageError(None, f"unknown mount option '{key}={value}' (see vhdfs --help)")


def _size_value(key: str, value: str, minimum: int) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise UsageError(None, f"{key}: {exc}") from None
    if size < minimum:
        raise UsageError(None, f"{key} {value} is below the minimum {format_size(minimum)}")
    return size


def escape_fuse_value(text: str) -> str:
    """Escape a value for libfuse's option parser, which splits on commas.

    A backslash escapes the next character. Non-ASCII characters cannot be passed at all
    (pyfuse3 encodes options as ASCII), so they become ``?``; the value is only informational
    (the ``fsname`` shown in /proc/mounts).
    """
    out = []
    for char in text:
        if char in ",\\":
            out.append("\\" + char)
        elif ord(char) < 32 or ord(char) > 126:
            out.append("?")
        else:
            out.append(char)
    return "".join(out)
