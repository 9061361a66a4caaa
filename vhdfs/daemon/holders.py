"""Who keeps a mount busy.

Processes with files open under it (or working in it), loop devices backed by a file in it,
and mounts below it.

Only ``/proc`` and ``/sys`` are read (links and small attribute files); nothing under the
mountpoint is ever opened or stat'ed, because a daemon must never send a request to the
file system it serves itself. Processes of other users cannot be seen without privileges;
they are then missing from the answer, not guessed.
"""

from __future__ import annotations

import contextlib
import os

from vhdfs.daemon.mounts import mounts_below
from vhdfs.text import printable


def _within(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def holders(mountpoint: str) -> list[str]:
    """What uses ``mountpoint`` or a file below it, one description each, sorted.

    For example ``PID 4242 (mkfs.ext4) has /mnt/disk/disk.raw open``,
    ``/dev/loop3 is backed by /mnt/disk/disk.raw``, ``/mnt/guest is mounted below it``.
    """
    found: set[str] = set()
    own = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == own:
            continue
        for kind in ("cwd", "root"):
            with contextlib.suppress(OSError):
                if _within(os.readlink(f"/proc/{pid}/{kind}"), mountpoint):
                    found.add(f"PID {pid} ({_command(pid)}) works in {mountpoint}")
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if _within(target, mountpoint):
                        found.add(f"PID {pid} ({_command(pid)}) has {target} open")
    with contextlib.suppress(OSError):
        for device in os.listdir("/sys/block"):
            if not device.startswith("loop"):
                continue
            with contextlib.suppress(OSError):
                with open(f"/sys/block/{device}/loop/backing_file") as f:
                    backing = f.read().strip()
                if _within(backing, mountpoint):
                    found.add(f"/dev/{device} is backed by {backing}")
    for below in mounts_below(mountpoint):
        found.add(f"{below} is mounted below it")
    # Process names and paths are anyone's text: escaped before a terminal or log sees them.
    return sorted(printable(line) for line in found)
