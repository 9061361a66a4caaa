"""The trio side of the daemon: serve FUSE requests until the mount is gone.

``serve`` runs ``pyfuse3.main`` beside a signal watcher, one write-back flusher per writable
disk, the control socket (``vhdfs -u``) and, under systemd, a status reporter. SIGINT, SIGTERM
and SIGHUP, like ``vhdfs -u``, go through ``Shutdown``: write out and sync, then a normal
unmount, or keep serving while the mount is in use (after a signal, retrying until it is not).
An unmount from outside (``fusermount3 -u``, ``umount``) ends the main loop by itself.
Either way every disk is then written out and synced before its images are closed, with the
signal watcher still running, so that another signal cannot kill the process in the middle of
that last write-out. SIGUSR1 logs the statistics of every disk.

Under systemd (``NOTIFY_SOCKET``), READY=1 is sent only once each raw file has answered a read
(made by a worker thread while this loop serves it), STATUS= every few seconds, STOPPING=1 when
a stop begins.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import pyfuse3
import trio

from vhdfs.daemon.control import ControlServer
from vhdfs.daemon.notify import Notifier
from vhdfs.daemon.shutdown import Shutdown
from vhdfs.disk.virtual import VirtualDisk
from vhdfs.errors import VhdfsError
from vhdfs.units import format_size

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds between STATUS= reports to systemd.
STATUS_INTERVAL = 5.0


@dataclass
class ServeContext:
    """What ``serve`` needs to know of the mount besides its disks."""

    #: The absolute mountpoint (``None`` if unknown: a ``/dev/fd/N`` mount on an old kernel).
    mountpoint: str | None = None
    #: False for a ``/dev/fd/N`` mount made by ``mount.fuse3 -o drop_privileges``.
    can_unmount: bool = True
    #: ``major:minor`` of the mount, naming its control socket (``None``: no socket).
    device: str | None = None
    #: The raw files, read once before READY=1 is sent.
    raw_paths: list[str] = field(default_factory=list)
    #: Called once signals are handled, right before requests are served.
    on_ready: Callable[[], None] | None = None
    notifier: Notifier = field(default_factory=Notifier)


async def serve(disks: Sequence[VirtualDisk], context: ServeContext) -> None:
    """Serve the mounted file system until it is unmounted.

    Raises:
        VhdfsError: The final write-out of a disk failed (the others are still closed).
    """
    notifier = context.notifier
    shutdown = Shutdown(
        disks,
        context.mountpoint,
        notifier,
        can_unmount=context.can_unmount,
        device=context.device,
    )
    stop_by_control = partial(shutdown.request, "vhdfs -u")
    control = None
    if context.device is not None and context.mountpoint is not None:
        control = ControlServer(context.device, context.mountpoint, stop_by_control)
    serving = True

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGUSR1:
                    for disk in disks:
                        log.warning("%s: %s", disk.chain.leaf.path, disk.statistics())
                elif serving:
                    nursery.start_soon(partial(shutdown.request, f"{name} received", retry=True))
                else:
                    log.warning("%s received while writing out; finishing first", name)

    failure: VhdfsError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        if control is not None:
            # Beside the final write-out too: clients of an accepted unmount wait through it.
            nursery.start_soon(control.keep_clients_waiting)
        try:
            async with trio.open_nursery() as helpers:
                for disk in disks:
                    if disk.writeback is not None:
                        helpers.start_soon(disk.writeback.run_flusher)
                if control is not None:
                    await helpers.start(control.serve)
                if context.mountpoint is not None and context.can_unmount:
                    helpers.start_soon(shutdown.retry_while_busy)
                if notifier.enabled:
                    helpers.start_soon(_announce_ready, context.raw_paths, notifier)
                    helpers.start_soon(_report_status, disks, notifier)
                if context.on_ready is not None:
                    context.on_ready()
                await pyfuse3.main()
                serving = False
                helpers.cancel_scope.cancel()
        finally:
            serving = False
            notifier.send(STOPPING=1, STATUS="writing out")
            for disk in disks:
                try:
                    await disk.aclose()
                except VhdfsError as exc:
                    log.error("%s: could not write out all data: %s", disk.chain.leaf.path, exc)
                    failure = failure or exc
            if control is not None:
                control.finish(0 if failure is None else failure.exit_code)
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _read_first_sector(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.pread(fd, 512, 0)
    finally:
        os.close(fd)


async def _announce_ready(raw_paths: list[str], notifier: Notifier) -> None:
    """Send READY=1 once every raw file has answered a read.

    The read is made from a worker thread: this loop must stay free to answer it.
    """
    for path in raw_paths:
        try:
            await trio.to_thread.run_sync(_read_first_sector, path, abandon_on_cancel=True)
        except OSError as exc:
            log.error("%s: the raw file does not read: %s", path, exc.strerror)
            notifier.send(STATUS=f"{path} does not read: {exc.strerror}")
            return
    notifier.send(READY=1, STATUS="serving")


async def _report_status(disks: Sequence[VirtualDisk], notifier: Notifier) -> None:
    while True:
        await trio.sleep(STATUS_INTERVAL)
        notifier.send(STATUS=status_line(disks))


def status_line(disks: Sequence[VirtualDisk]) -> str:
    """One line for systemd's STATUS=: what waits to be written, and the caches."""
    dirty = 0
    parts = []
    for disk in disks:
        stats = disk.statistics()
        if stats.writeback is not None:
            dirty += stats.writeback.dirty_bytes
        cache = stats.cache
        looked = cache.hits + cache.misses
        hit_rate = f", {100 * cache.hits // looked}% hits" if looked else ""
        parts.append(
            f"{os.path.basename(disk.chain.leaf.path)}: cache {format_size(cache.bytes)} "
            f"of {format_size(cache.max_bytes)}{hit_rate}"
        )
    return f"serving {len(disks)} disk(s), {format_size(dirty)} to write out; " + "; ".join(parts)
