"""The trio side of the daemon: serve FUSE requests until unmounted or signalled.

``serve`` runs ``pyfuse3.main`` beside a signal watcher. SIGINT, SIGTERM and SIGHUP end the
main loop through ``pyfuse3.terminate``; the caller then unmounts. An unmount from outside
(``fusermount3 -u``, ``umount``) ends the main loop by itself, and the mount is already gone.
SIGUSR1 logs the cache and I/O statistics of every disk.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from vhdfs.disk import VirtualDisk

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def serve(disks: Sequence[VirtualDisk], on_ready: Callable[[], None] | None = None) -> bool:
    """Serve the mounted file system.

    Args:
        disks: Every disk of the mount, closed when serving ends.
        on_ready: Called once signals are handled, right before requests are served.

    Returns:
        True when a signal ended the loop (the mount must still be removed), False when the
        file system was unmounted from outside.
    """
    stopped_by_signal = False

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal stopped_by_signal
        with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    for disk in disks:
                        log.warning("%s: %s", disk.chain.leaf.path, disk.statistics())
                    continue
                log.info("%s received, unmounting", signal.Signals(signum).name)
                stopped_by_signal = True
                pyfuse3.terminate()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals)
            if on_ready is not None:
                on_ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        for disk in disks:
            await disk.aclose()
    return stopped_by_signal
