r"""The mount table as the kernel shows it in /proc/self/mountinfo.

Used to name the vhdfs mount that holds a locked image, to refuse mounting on top of another
vhdfs mount, to find the mounts on top of ours (they keep it busy), and to learn the device
number of a new mount, which names its control socket (``daemon.control``).

A vhdfs mount carries the absolute path of its first image (the overlay, with ``overlay=``) as
its source. The kernel shows space, tab, newline and backslash in these fields as octal
escapes (``\040``); they are decoded here.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

FSTYPE = "fuse.vhdfs"
_OCTAL = re.compile(rb"\\([0-7]{3})")
_USER_ID = re.compile(r"(?:^|,)user_id=(\d+)(?:,|$)")


def _unescape(field: str) -> str:
    raw = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), os.fsencode(field))
    return os.fsdecode(raw)


class MountEntry(NamedTuple):
    """One line of mountinfo."""

    #: ``major:minor`` of the mounted file system.
    device: str
    mountpoint: str
    fstype: str
    source: str
    #: The user who made a FUSE mount (its ``user_id=``), ``None`` for other file systems.
    owner: int | None = None


def mount_table() -> list[MountEntry]:
    """Every mount visible to this process, in mount order (later ones on top)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, rest = before.split(" "), after.split(" ")
        if len(fields) >= 5 and len(rest) >= 2:
            owner = _USER_ID.search(rest[2]) if len(rest) >= 3 else None
            table.append(
                MountEntry(
                    fields[2],
                    _unescape(fields[4]),
                    rest[0],
                    _unescape(rest[1]),
                    int(owner[1]) if owner else None,
                )
            )
    return table


def vhdfs_mounts() -> list[MountEntry]:
    """Every vhdfs mount visible to this process."""
    return [entry for entry in mount_table() if entry.fstype == FSTYPE]


def mount_of(image: str) -> str | None:
    """The mountpoint of the vhdfs mount serving ``image``, if there is one."""
    source = os.path.realpath(image)  # what the mount carries as its source (fsname)
    for entry in vhdfs_mounts():
        if entry.source == source:
            return entry.mountpoint
    return None


def mount_of_fuse_device(fd: int) -> MountEntry | None:
    """The mount served through the open FUSE device ``fd`` (one ``mount.fuse3`` made).

    The kernel names the connection in the descriptor's fdinfo (``fuse_connection:``, the
    mount's device number); without that line (older kernels) it cannot be told.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        number = int(fields["fuse_connection"])
    except (OSError, KeyError, ValueError):
        return None
    device = f"{number >> 20}:{number & 0xFFFFF}"  # the kernel's dev_t: major, then minor
    for entry in mount_table():
        if entry.device == device:
            return entry
    return None


def top_mount_at(mountpoint: str, *, resolved: bool = False) -> MountEntry | None:
    """The mount visible at ``mountpoint`` (the last one mounted there), if any.

    ``resolved``: the path is already absolute and free of symlinks; it is then not looked
    at (a FUSE daemon must never look at its own mountpoint before it serves).
    """
    target = mountpoint if resolved else os.path.realpath(mountpoint)
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry
    return found


def mounts_below(mountpoint: str) -> list[str]:
    """Mountpoints strictly below ``mountpoint``."""
    prefix = mountpoint.rstrip("/") + "/"
    return [entry.mountpoint for entry in mount_table() if entry.mountpoint.startswith(prefix)]
