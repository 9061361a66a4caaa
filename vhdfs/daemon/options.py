"""``-o`` options: vhdfs's own keys, FUSE/kernel flags passed through, fstab words ignored.

Everything is validated here, before ``pyfuse3.init``: libfuse answers an unknown option with a
message of its own and a generic exception, and some options it accepts kill the session at the
kernel handshake (``max_read=``), so only the set below is ever passed on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vhdfs.cache.block_cache import DEFAULT_CACHE_SIZE, MIN_CACHE_SIZE
from vhdfs.errors import UsageError
from vhdfs.hostio import IoMode
from vhdfs.units import format_size, parse_size

log = logging.getLogger(__name__)

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
        "relatime",
        "norelatime",
        "diratime",
        "nodiratime",
        "strictatime",
        "nostrictatime",
    }
)
#: Words mount(8) and fstab use that mean nothing to a FUSE file system.
IGNORED_FLAGS = frozenset(
    {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "_netdev", "nofail"}
)


@dataclass
class MountOptions:
    """What the ``-o`` options asked for."""

    read_only: bool = True
    cache_size: int = DEFAULT_CACHE_SIZE
    io_mode: IoMode = IoMode.INLINE
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
        options.read_only = True
    elif key == "rw":
        log.warning("writing is not supported yet; mounting read-only")
        options.read_only = True
    elif key in PASS_THROUGH_FLAGS:
        if key not in options.fuse_flags:
            options.fuse_flags.append(key)
    else:
        raise UsageError(None, f"unknown mount option '{key}' (see vhdfs --help)")


def _apply_value(options: MountOptions, key: str, value: str) -> None:
    if key == "cache_size":
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise UsageError(None, f"cache_size: {exc}") from None
        if size < MIN_CACHE_SIZE:
            raise UsageError(
                None, f"cache_size {value} is below the minimum {format_size(MIN_CACHE_SIZE)}"
            )
        options.cache_size = size
    elif key == "io":
        try:
            options.io_mode = IoMode(value)
        except ValueError:
            choices = ", ".join(m.value for m in IoMode)
            raise UsageError(None, f"io={value}: expected one of {choices}") from None
    elif key == "fsname":
        options.fsname = value
    elif key == "subtype":
        options.subtype = value
    else:
        raise UsageError(None, f"unknown mount option '{key}={value}' (see vhdfs --help)")


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
