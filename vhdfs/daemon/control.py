"""The control socket of a mount, and ``vhdfs -u``: an unmount that waits for the daemon.

Each daemon listens on an abstract Unix socket named after its mount's device number
(``vhdfs/0:53``), which anyone can find in /proc/self/mountinfo without touching the mount, from
any path the mount is reachable by (a bind mount too). Only root and the user the daemon runs
as may use it (checked with ``SO_PEERCRED``).

A device number is free for the next mount as soon as the kernel has unmounted. The daemon
closes its socket the moment serving ends, before its final write-out; a new daemon that still
finds the name taken (it raced that moment) keeps serving and binds once the name is free.

The protocol is one request line, ``unmount``, and reply lines of tab-separated fields:

* ``busy<TAB>holder<TAB>...``: the mount is in use; nothing was unmounted; the daemon serves on.
* ``failed<TAB>message``: the write-out failed; nothing was unmounted.
* ``unmounting``: the unmount was accepted. Later ``done<TAB>status`` gives the daemon's exit
  status once its final write-out is over, and the connection ends when the process exits.

The client learns the daemon's PID from the socket and waits for that process to be gone
(a pidfd), so it returns only once the daemon has written out, synced and exited.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO

import trio

from vhdfs.daemon.mounts import FSTYPE, MountEntry, top_mount_at
from vhdfs.daemon.shutdown import StopOutcome
from vhdfs.errors import ExitCode, MountError, UsageError

log = logging.getLogger(__name__)

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


#: Seconds between attempts to bind a name an exiting daemon still holds.
BIND_RETRY = 0.5


def socket_name(device: str) -> str:
    """The abstract socket address of the mount with device number ``device``."""
    return f"\0vhdfs/{device}"


def _peer(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    pid, uid, _ = _CREDENTIALS.unpack(raw)
    return pid, uid


#: Handles an unmount request.
StopHandler = Callable[[], Awaitable[StopOutcome]]


class ControlServer:
    """The daemon's side: answers ``unmount`` requests with a stop handler.

    Connections of accepted requests are kept open until the daemon exits; ``finish`` tells
    them the exit status first.
    """

    def __init__(self, device: str, mountpoint: str, on_unmount: StopHandler) -> None:
        self.name = socket_name(device)
        self.mountpoint = mountpoint
        self.on_unmount = on_unmount
        self._waiting: list[trio.socket.SocketType] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and handle connections until cancelled.

        Started once listening, or once the name turned out to be held by an exiting daemon
        (binding is then retried while the mount is served: it never fails the mount).
        """
        # ``with``: the name is released the moment serving ends, not when the process exits.
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            await self._bind(listener, task_status)
            listener.listen(4)
            async with trio.open_nursery() as nursery:
                while True:
                    connection, _ = await listener.accept()
                    nursery.start_soon(self._handle, connection)

    async def _bind(
        self, listener: trio.socket.SocketType, task_status: trio.TaskStatus[None]
    ) -> None:
        started = False
        while True:
            try:
                await listener.bind(self.name)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
            if not started:
                log.warning(
                    "%s: the control socket of this device number is still held by an exiting "
                    "daemon; vhdfs -u works once it is gone",
                    self.mountpoint,
                )
                task_status.started()
                started = True
            await trio.sleep(BIND_RETRY)
        if not started:
            task_status.started()

    async def _handle(self, connection: trio.socket.SocketType) -> None:
        _, uid = _peer(connection)
        if uid not in (0, os.getuid()):
            connection.close()
            return
        request = b""
        while not request.endswith(b"\n") and len(request) < 64:
            chunk = await connection.recv(64)
            if not chunk:
                break
            request += chunk
        if request.strip() != b"unmount":
            connection.close()
            return
        # Shielded: a successful unmount ends the serving loop, and with it this task, before
        # the reply would otherwise be sent.
        with trio.CancelScope(shield=True):
            outcome = await self.on_unmount()
        if outcome.stopping:
            os.write(connection.fileno(), b"unmounting\n")
            self._waiting.append(connection)
            return
        kind = "busy" if outcome.busy else "failed"
        reasons = (r.replace("\t", " ").replace("\n", " ") for r in outcome.reasons)
        line = "\t".join([kind, *reasons])
        await connection.send(line.encode(errors="replace") + b"\n")
        connection.close()

    def finish(self, status: int) -> None:
        """Tell waiting clients the exit status (their connections end with the process)."""
        for connection in self._waiting:
            with contextlib.suppress(OSError):  # a client that left does not matter
                os.write(connection.fileno(), f"done\t{status}\n".encode())


@dataclass(frozen=True, slots=True)
class UnmountResult:
    """What ``vhdfs -u`` achieved."""

    status: int
    message: str | None = None


def daemon_alive(entry: MountEntry) -> bool:
    """Whether the daemon of a vhdfs mount still runs (its control socket answers)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(socket_name(entry.device))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def unmount(mountpoint: str) -> UnmountResult:
    """Unmount the vhdfs mount at ``mountpoint`` and wait until its daemon has exited.

    Raises:
        VhdfsError: Not a vhdfs mount, or its daemon cannot be reached.
    """
    entry = top_mount_at(mountpoint)
    if entry is None:
        raise UsageError(mountpoint, "not a mountpoint")
    if entry.fstype != FSTYPE:
        raise UsageError(mountpoint, f"not a vhdfs mount (it is {entry.fstype})")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            client.connect(socket_name(entry.device))
        except OSError:
            raise MountError(
                mountpoint,
                "its daemon is gone (the mount is dead); remove it with "
                f"fusermount3 -u {entry.mountpoint}",
            ) from None
        pid, _ = _peer(client)
        process = os.pidfd_open(pid)
        replies = client.makefile("rb")
        try:
            client.sendall(b"unmount\n")
            reply = _read_line(replies)
            fields = reply.split("\t")
            if fields[0] == "busy":
                return UnmountResult(
                    ExitCode.BUSY, f"in use, nothing unmounted: {'; '.join(fields[1:])}"
                )
            if fields[0] != "unmounting":
                return UnmountResult(ExitCode.IO_ERROR, "; ".join(fields[1:]) or reply)
            done = _read_line(replies)
            select.select([process], [], [])  # the daemon's process is gone
        finally:
            replies.close()
            os.close(process)
    finally:
        client.close()
    if done.startswith("done\t"):
        status = int(done.split("\t")[1])
        return UnmountResult(status, None if status == 0 else "the final write-out failed")
    return UnmountResult(ExitCode.OK)


def _read_line(replies: BinaryIO) -> str:
    return replies.readline().decode(errors="replace").strip()
