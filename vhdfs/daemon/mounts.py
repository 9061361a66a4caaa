"""Who has an image mounted: vhdfs mounts as the kernel lists them in /proc/self/mountinfo.

Used to name the holder when an image is locked: a vhdfs mount carries the path of its first
image (the overlay, with ``-o overlay=``) as ``fsname``, which mountinfo shows as the mount
source. When ``-o fsname=`` replaced it, or the path had characters libfuse cannot carry (they
become ``?``), the holder is not found and the error says only that the image is in use.
"""

from __future__ import annotations

import re

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def vhdfs_mounts() -> list[tuple[str, str]]:
    """``(source, mountpoint)`` of every vhdfs mount visible to this process."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if len(fields) >= 5 and len(rest) >= 2 and rest[0] == "fuse.vhdfs":
            found.append((_unescape(rest[1]), _unescape(fields[4])))
    return found


def mount_of(image: str) -> str | None:
    """The mountpoint of the vhdfs mount serving ``image``, if there is one."""
    for source, mountpoint in vhdfs_mounts():
        if source == image:
            return mountpoint
    return None
