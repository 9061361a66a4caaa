"""The slow tiers: long runs with one command each, outside the default suite."""

from __future__ import annotations

import signal
from types import FrameType


def stop_cleanly_on_signals() -> None:
    """Make SIGTERM and SIGINT raise in the main thread, so every mount is torn down.

    A campaign started in the background of a shell inherits SIGINT ignored, and SIGTERM
    would end it without running its ``finally`` blocks, leaving mounts and daemons behind.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        # Once: a second signal must not cut the teardown the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
