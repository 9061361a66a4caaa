"""The control socket of a mount, and ``vhdfs -u``: an unmount that waits for the daemon.

Each daemon listens on an abstract Unix socket named ``vhdfs/DEVICE/PID.TOKEN``: the mount's
device number (which anyone finds in /proc/self/mountinfo without touching the mount, from any
path the mount is reachable by, a bind mount too), the daemon's PID and a random token. Abstract
names belong to whoever binds them first, and any local user may bind any name, so the client
trusts no name: it lists the candidates in /proc/net/unix and talks only to a peer whose
credentials (``SO_PEERCRED``) show the PID the name carries and the user who made the mount, or
root. A name squatted by another user is never used, and cannot take the daemon's own name
(the token is unpredictable), so squatting can neither stop a mount nor answer for it.
The daemon in turn serves only root and its own user.

The protocol is one request line, ``unmount``, and reply lines of tab-separated fields:

* ``working``: sent every ``KEEPALIVE`` seconds while a write-out runs, so that the client can
  tell a daemon at work from one that stopped answering;
* ``busy<TAB>holder<TAB>...``: the mount is in use; nothing was unmounted; the daemon serves on.
* ``failed<TAB>message``: the write-out failed; nothing was unmounted.
* ``unmounting``: the unmount was accepted. Later ``done<TAB>status`` gives the daemon's exit
  status once its final write-out is over, and the connection ends when the process exits.
* ``written``: written out and synced, but the daemon may not unmount (a ``mount.fuse3 -o
  drop_privileges`` mount): the client unmounts, and ``done`` follows as for ``unmounting``.

The client waits for that process to be gone (a pidfd), so it returns only once the daemon has
written out, synced and exited. Every wait is bounded: a daemon that says nothing for
``ANSWER_TIMEOUT`` seconds is reported, never waited for forever. A client that leaves early
(Ctrl-C, a script that closes the socket) changes nothing for the daemon: the request it made
goes on, and replies to a vanished client are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import trio

from vhdfs.daemon.mounts import FSTYPE, MountEntry, top_mount_at
from vhdfs.daemon.shutdown import StopOutcome, mount_replaced, unmount_outcome
from vhdfs.errors import ExitCode, MountError, UsageError

log = logging.getLogger(__name__)

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PREFIX = "vhdfs/"

#: Seconds between ``working`` lines while the daemon writes out.
KEEPALIVE = 2.0
#: Seconds ``vhdfs -u`` waits for any line (or the daemon's exit) before giving up.
ANSWER_TIMEOUT = 30.0
#: Seconds ``vhdfs -u`` waits for the socket to take its request.
_SEND_TIMEOUT = 5.0
#: Seconds the daemon waits after a failed ``accept`` (out of descriptors) before the next.
BIND_RETRY = 0.5


def socket_name(device: str, pid: int, token: str) -> str:
    """The abstract socket address of the daemon ``pid`` serving the mount ``device``."""
    return f"\0{_PREFIX}{device}/{pid}.{token}"


def _peer(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    pid, uid, _ = _CREDENTIALS.unpack(raw)
    return pid, uid


#: Handles an unmount request.
StopHandler = Callable[[], Awaitable[StopOutcome]]


def _send(connection: trio.socket.SocketType, line: str) -> bool:
    """Send one line without waiting; False when the client has gone (never raises)."""
    try:
        os.write(connection.fileno(), line.encode(errors="replace") + b"\n")
    except OSError:
        return False
    return True


class ControlServer:
    """The daemon's side: answers ``unmount`` requests with a stop handler.

    Connections of accepted requests are kept open until the daemon exits; ``finish`` tells
    them the exit status first. Run ``keep_clients_waiting`` beside the whole life of the
    daemon, the final write-out included.
    """

    def __init__(self, device: str, mountpoint: str, on_unmount: StopHandler) -> None:
        self.name = socket_name(device, os.getpid(), secrets.token_hex(16))
        self.mountpoint = mountpoint
        self.on_unmount = on_unmount
        #: Clients waiting for an answer (a write-out runs) or for the daemon's exit.
        self._waiting: list[trio.socket.SocketType] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and handle connections until cancelled; started once listening."""
        # ``with``: the name is released the moment serving ends, not when the process exits.
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            try:
                await listener.bind(self.name)
                listener.listen(4)
            except OSError as exc:
                # Never fatal: the mount serves on, and SIGTERM still stops it.
                log.warning(
                    "%s: no control socket (%s); vhdfs -u cannot reach this daemon, stop it "
                    "with SIGTERM",
                    self.mountpoint,
                    exc.strerror,
                )
                task_status.started()
                return
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        connection, _ = await listener.accept()
                    except OSError as exc:  # out of descriptors or memory: never fatal
                        log.warning("control socket: %s", exc.strerror)
                        await trio.sleep(BIND_RETRY)
                        continue
                    nursery.start_soon(self._handle, connection)

    async def keep_clients_waiting(self) -> None:
        """Send ``working`` to every waiting client every ``KEEPALIVE`` seconds, forever."""
        while True:
            await trio.sleep(KEEPALIVE)
            for connection in list(self._waiting):
                if not _send(connection, "working"):
                    self._drop(connection)

    def _drop(self, connection: trio.socket.SocketType) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(connection)
        connection.close()

    async def _handle(self, connection: trio.socket.SocketType) -> None:
        try:
            _, uid = _peer(connection)
            if uid not in (0, os.getuid()):
                connection.close()
                return
            request = b""
            with trio.move_on_after(ANSWER_TIMEOUT):
                while not request.endswith(b"\n") and len(request) < 64:
                    chunk = await connection.recv(64)
                    if not chunk:
                        break
                    request += chunk
        except OSError:  # the client has gone: nothing to answer
            connection.close()
            return
        if request.strip() != b"unmount":
            connection.close()
            return
        self._waiting.append(connection)
        # Shielded: a successful unmount ends the serving loop, and with it this task, before
        # the reply would otherwise be sent. The request goes on whether or not the client
        # stays to hear the answer.
        with trio.CancelScope(shield=True):
            outcome = await self.on_unmount()
        if outcome.stopping or outcome.caller_unmounts:
            if not _send(connection, "unmounting" if outcome.stopping else "written"):
                self._drop(connection)
            return
        kind = "busy" if outcome.busy else "failed"
        reasons = (r.replace("\t", " ").replace("\n", " ") for r in outcome.reasons)
        _send(connection, "\t".join([kind, *reasons]))
        self._drop(connection)

    def finish(self, status: int) -> None:
        """Tell waiting clients the exit status (their connections end with the process)."""
        for connection in self._waiting:
            _send(connection, f"done\t{status}")


@dataclass(frozen=True, slots=True)
class UnmountResult:
    """What ``vhdfs -u`` achieved."""

    status: int
    message: str | None = None


def _listed_names(device: str) -> Iterator[tuple[str, int]]:
    """Abstract socket names of ``device`` in /proc/net/unix, with the PID each claims."""
    prefix = f"@{_PREFIX}{device}/"
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return
    seen = set()
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 8 or not fields[7].startswith(prefix) or fields[7] in seen:
            continue
        seen.add(fields[7])
        pid, dot, _ = fields[7][len(prefix) :].partition(".")
        if dot and pid.isdigit():
            yield "\0" + fields[7][1:], int(pid)


def _trusted(entry: MountEntry, pid: int, peer: tuple[int, int]) -> bool:
    """Whether a peer is the daemon its name says: that PID, and root or the mount's owner."""
    peer_pid, peer_uid = peer
    return peer_pid == pid and (peer_uid == 0 or peer_uid == entry.owner)


def _plausible(entry: MountEntry, pid: int) -> bool:
    """Whether process ``pid`` runs as root or the mount's owner (cheap, before connecting)."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return uid == 0 or uid == entry.owner


def _connect_to_daemon(entry: MountEntry) -> tuple[socket.socket, int] | None:
    """A connection to the daemon of ``entry``, and its PID; ``None`` if none answers.

    Connecting never waits: a name whose backlog another user keeps full is skipped, so no
    number of squatted names can stall the search.
    """
    names = [(name, pid) for name, pid in _listed_names(entry.device) if _plausible(entry, pid)]
    for name, pid in names:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        client.setblocking(False)
        try:
            client.connect(name)
            if _trusted(entry, pid, _peer(client)):
                client.setblocking(True)
                return client, pid
        except OSError:
            pass
        client.close()
    return None


def daemon_alive(entry: MountEntry) -> bool:
    """Whether the daemon of a vhdfs mount still runs (its control socket answers)."""
    found = _connect_to_daemon(entry)
    if found is None:
        return False
    found[0].close()
    return True


class _Replies:
    """Lines from the daemon, each awaited at most ``ANSWER_TIMEOUT`` s of silence."""

    def __init__(self, client: socket.socket, process: int, mountpoint: str, pid: int) -> None:
        self.client = client
        self.process = process
        self.mountpoint = mountpoint
        self.pid = pid
        self.buffer = b""
        self.closed = False

    def _silent(self) -> MountError:
        return MountError(
            self.mountpoint,
            f"its daemon (PID {self.pid}) said nothing for {ANSWER_TIMEOUT:.0f} s; it still "
            f"runs, the unmount may still happen (check with: findmnt {self.mountpoint})",
        )

    def line(self) -> str | None:
        """The next line other than ``working``; ``None`` once the daemon closed or exited."""
        while True:
            while b"\n" in self.buffer:
                raw, _, self.buffer = self.buffer.partition(b"\n")
                text = raw.decode(errors="replace").strip()
                if text != "working":
                    return text
            if self.closed:
                return None
            fds = [self.client.fileno(), self.process]
            ready, _, _ = select.select(fds, [], [], ANSWER_TIMEOUT)
            if not ready:
                raise self._silent()
            if fds[0] in ready:
                try:
                    chunk = self.client.recv(4096)
                except OSError:
                    chunk = b""
                self.buffer += chunk
                self.closed = not chunk
            elif self.process in ready:
                self.closed = True  # exited; what it sent before is still read

    def wait_exited(self) -> None:
        """Return once the daemon's process is gone."""
        if not select.select([self.process], [], [], ANSWER_TIMEOUT)[0]:
            raise self._silent()


def _unmount_for_the_daemon(entry: MountEntry) -> UnmountResult | None:
    """Unmount what a daemon without privileges has written out; ``None`` once done."""
    mountpoint = entry.mountpoint
    outcome = mount_replaced(mountpoint, entry.device)
    if outcome is None:
        try:
            argv = ["fusermount3", "-u", mountpoint]
            result = subprocess.run(argv, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return UnmountResult(ExitCode.IO_ERROR, f"cannot run fusermount3: {exc}")
        outcome = unmount_outcome(mountpoint, result.returncode, result.stderr)
    if outcome.stopping:
        return None
    if outcome.busy:
        return UnmountResult(
            ExitCode.BUSY, f"in use, nothing unmounted: {'; '.join(outcome.reasons)}"
        )
    return UnmountResult(ExitCode.IO_ERROR, "; ".join(outcome.reasons))


def unmount(mountpoint: str) -> UnmountResult:
    """Unmount the vhdfs mount at ``mountpoint`` and wait until its daemon has exited.

    Raises:
        VhdfsError: Not a vhdfs mount, its daemon cannot be reached, or it stopped answering.
    """
    entry = top_mount_at(mountpoint)
    if entry is None:
        raise UsageError(mountpoint, "not a mountpoint")
    if entry.fstype != FSTYPE:
        raise UsageError(mountpoint, f"not a vhdfs mount (it is {entry.fstype})")
    if os.getuid() not in (0, entry.owner):
        raise MountError(
            mountpoint, f"only root and the user who mounted it (uid {entry.owner}) may unmount it"
        )
    found = _connect_to_daemon(entry)
    if found is None:
        raise MountError(
            mountpoint,
            "its daemon is gone (the mount is dead); remove it with "
            f"fusermount3 -u {entry.mountpoint}",
        )
    client, pid = found
    try:
        return _ask_to_unmount(entry, mountpoint, client, pid)
    except OSError as exc:
        raise MountError(
            mountpoint, f"its daemon (PID {pid}) broke off the exchange: {exc.strerror}"
        ) from None


def _ask_to_unmount(
    entry: MountEntry, mountpoint: str, client: socket.socket, pid: int
) -> UnmountResult:
    try:
        try:
            process = os.pidfd_open(pid)
        except ProcessLookupError:
            raise MountError(
                mountpoint,
                "its daemon exited while asked to unmount; if the mount is still there, "
                f"remove it with fusermount3 -u {entry.mountpoint}",
            ) from None
        try:
            client.settimeout(_SEND_TIMEOUT)
            client.sendall(b"unmount\n")
            replies = _Replies(client, process, mountpoint, pid)
            reply = replies.line()
            if reply is None:
                raise MountError(mountpoint, f"its daemon (PID {pid}) closed without an answer")
            fields = reply.split("\t")
            if fields[0] == "busy":
                return UnmountResult(
                    ExitCode.BUSY, f"in use, nothing unmounted: {'; '.join(fields[1:])}"
                )
            if fields[0] == "written":
                refused = _unmount_for_the_daemon(entry)
                if refused is not None:
                    return refused
            elif fields[0] != "unmounting":
                return UnmountResult(ExitCode.IO_ERROR, "; ".join(fields[1:]) or reply)
            done = replies.line() or ""
            replies.wait_exited()
        finally:
            os.close(process)
    finally:
        client.close()
    if done.startswith("done\t") and done.split("\t")[1].isdigit():
        status = int(done.split("\t")[1])
        return UnmountResult(status, None if status == 0 else "the final write-out failed")
    # Unmounted, but the daemon died before it could say how its final write-out went.
    return UnmountResult(
        ExitCode.IO_ERROR, f"its daemon (PID {pid}) exited without reporting its final write-out"
    )
