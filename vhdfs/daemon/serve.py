"""The trio side of the daemon: serve FUSE requests until unmounted or signalled.

``serve`` runs ``pyfuse3.main`` beside a signal watcher and one write-back flusher per
writable disk. SIGINT, SIGTERM and SIGHUP end the main loop through ``pyfuse3.terminate``; the
caller then unmounts. An unmount from outside (``fusermount3 -u``, ``umount``) ends the main
loop by itself. Either way every disk is then flushed and synced before the images are
closed, with the signal watcher still running so that a second signal cannot kill the process
in the middle of that last flush. SIGUSR1 logs the statistics of every disk.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from vhdfs.disk.virtual import VirtualDisk
from vhdfs.errors import VhdfsError

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def serve(disks: Sequence[VirtualDisk], on_ready: Callable[[], None] | None = None) -> bool:
    """Serve the mounted file system.

    Args:
        disks: Every disk of the mount; flushed and closed when serving ends.
        on_ready: Called once signals are handled, right before requests are served.

    Returns:
        True when a signal ended the loop (the mount must still be removed), False when the
        file system was unmounted from outside.

    Raises:
        VhdfsError: The final flush of a disk failed (the others are still closed).
    """
    stopped_by_signal = False
    serving = True

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal stopped_by_signal
        with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    for disk in disks:
                        log.warning("%s: %s", disk.chain.leaf.path, disk.statistics())
                elif serving:
                    log.info("%s received, unmounting", signal.Signals(signum).name)
                    stopped_by_signal = True
                    pyfuse3.terminate()
                else:
                    log.warning(
                        "%s received while writing out; finishing first",
                        signal.Signals(signum).name,
                    )

    failure: VhdfsError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        try:
            async with trio.open_nursery() as flushers:
                for disk in disks:
                    if disk.writeback is not None:
                        flushers.start_soon(disk.writeback.run_flusher)
                if on_ready is not None:
                    on_ready()
                await pyfuse3.main()
                serving = False
                flushers.cancel_scope.cancel()
        finally:
            serving = False
            for disk in disks:
                try:
                    await disk.aclose()
                except VhdfsError as exc:
                    log.error("%s: could not write out all data: %s", disk.chain.leaf.path, exc)
                    failure = failure or exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return stopped_by_signal
