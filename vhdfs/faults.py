"""Crash points for the crash tests.

Named places in the write path where a test can have the daemon kill itself with SIGKILL,
exactly as ``kill -9`` or a power cut would stop it there.

Inert unless the environment variable ``VHDFS_CRASH_AT`` is set (read once, at import), as
``POINT`` or ``POINT:N`` (crash on the N-th time the point is reached). The points are named in
``vhdfs.image.commit``; see its table of what a crash leaves behind at each.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("VHDFS_CRASH_AT", "")
_POINT, _, _COUNT = _SPEC.partition(":")
_remaining = int(_COUNT or 1)


def crash_point(name: str) -> None:
    """Die here, at once and without cleaning up, if the crash tests asked for this point."""
    global _remaining
    if name != _POINT:
        return
    _remaining -= 1
    if _remaining == 0:
        os.kill(os.getpid(), signal.SIGKILL)
