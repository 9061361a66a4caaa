"""Stopping a mount without losing data: write out, then a normal unmount, or keep serving.

A stop request (SIGTERM, SIGINT, SIGHUP, or ``vhdfs -u`` through the control socket) first
writes out and syncs every disk, then asks for a normal, non-lazy unmount (``fusermount3 -u``,
run as a separate process so that the daemon keeps answering the kernel meanwhile). If the
mount is in use — a program has a raw file open, a loop device is backed by one, a guest file
system is mounted on top — the kernel refuses, and the daemon keeps serving: it names the
holders once and switches every disk to write-through, so that whatever is written from then
on is in the image and synced before it is acknowledged, and a later ``kill -9`` loses nothing.

A stop by signal is not forgotten when the mount is busy: the daemon tries the unmount again
every ``RETRY_INTERVAL`` seconds (quietly) and ends by itself, as any stop does, once the
holders have let go — a service manager's single SIGTERM is enough. A busy ``vhdfs -u`` is
answered "busy" and not retried: its caller decides what to do.

A mount made by ``mount.fuse3 -o drop_privileges`` is served by a process without any
capability, which the kernel does not let unmount anything. A stop then writes out and syncs,
switches to write-through and serves on (a dead mount would be worse), and leaves the unmount to
a caller who may: ``vhdfs -u`` is told so (``caller_unmounts``) and unmounts itself, ``umount``
does it too, and the daemon exits as the session ends.

A successful unmount ends the FUSE session; the serving loop then returns and the final
write-out finds nothing left to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pyfuse3
import trio

from vhdfs.daemon.holders import holders
from vhdfs.daemon.mounts import top_mount_at
from vhdfs.daemon.notify import Notifier
from vhdfs.disk.virtual import VirtualDisk
from vhdfs.errors import VhdfsError

log = logging.getLogger(__name__)

#: How much more time to ask systemd for, each time, while a write-out runs.
_EXTEND_SECONDS = 30
#: Seconds between unmount attempts after a stop signal found the mount busy.
RETRY_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class StopOutcome:
    """What a stop request led to."""

    #: The unmount was accepted: the daemon is ending.
    stopping: bool
    #: Refused because the mount is in use (else because the write-out failed).
    busy: bool = False
    #: Why not, when it was refused: the holders of a busy mount, or the error.
    reasons: tuple[str, ...] = ()
    #: Written out, but this daemon may not unmount: the caller must (drop_privileges).
    caller_unmounts: bool = False


class Shutdown:
    """The stop procedure of one mount.

    Args:
        disks: Every disk of the mount.
        mountpoint: The absolute mountpoint, or ``None`` when it is unknown (a ``/dev/fd/N``
            mount on a kernel that does not say which): the session is then ended without an
            unmount.
        notifier: The service manager, told STOPPING=1 and how the stop went.
        can_unmount: False when this process has no privilege to unmount (drop_privileges).
        device: The mount's device number: an unmount is tried only while the mount at
            ``mountpoint`` is still this one (after ``umount -l`` another may be there).
    """

    def __init__(
        self,
        disks: Sequence[VirtualDisk],
        mountpoint: str | None,
        notifier: Notifier,
        *,
        can_unmount: bool = True,
        device: str | None = None,
    ) -> None:
        self.disks = disks
        self.mountpoint = mountpoint
        self.notifier = notifier
        self.can_unmount = can_unmount
        self.device = device
        self.stopping = False
        self._lock = trio.Lock()
        #: Set once a stop signal found the mount busy: the unmount is then retried.
        self._retry = trio.Event()

    async def request(self, reason: str, *, retry: bool = False) -> StopOutcome:
        """Write everything out, then try to unmount. Never raises for a busy mount.

        ``retry``: if the mount is busy, keep trying (``retry_while_busy``) until it is not.
        """
        async with self._lock:
            if self.stopping:
                return StopOutcome(True)
            log.info("%s: writing out, then unmounting", reason)
            self.notifier.send(STOPPING=1, STATUS=f"{reason}: writing out")
            try:
                await self.write_out()
            except VhdfsError as exc:
                log.error("could not write out before unmounting: %s", exc)
                self.notifier.send(STATUS=f"write-out failed, serving on: {exc}")
                return StopOutcome(False, False, (str(exc),))
            if self.mountpoint is None:
                self.stopping = True
                pyfuse3.terminate()
                return StopOutcome(True)
            if not self.can_unmount:
                return self._leave_unmount_to_caller(self.mountpoint)
            outcome = await self._unmount(self.mountpoint)
            if outcome.stopping:
                self.stopping = True
                return outcome
            for disk in self.disks:
                disk.write_through()
            why = "; ".join(outcome.reasons)
            if outcome.busy:
                log.warning("%s is in use, serving on (writing through): %s", self.mountpoint, why)
            else:
                log.error("%s could not be unmounted, serving on: %s", self.mountpoint, why)
            if retry and outcome.busy:
                self._retry.set()
                self.notifier.send(
                    STATUS=f"in use, unmounting once the holders let go (serving on): {why}"
                )
            else:
                self.notifier.send(STATUS=f"not unmounted, serving on: {why}")
            return outcome

    def _leave_unmount_to_caller(self, mountpoint: str) -> StopOutcome:
        for disk in self.disks:
            disk.write_through()
        why = (
            "written out; mounted by mount.fuse3 with drop_privileges, so this daemon may not "
            f"unmount: serving on until someone runs umount {mountpoint} (or vhdfs -u)"
        )
        log.warning("%s: %s", mountpoint, why)
        self.notifier.send(STATUS=why)
        return StopOutcome(False, False, (why,), caller_unmounts=True)

    async def retry_while_busy(self) -> None:
        """Once a stop signal found the mount busy, retry the unmount until it succeeds.

        Runs beside the serving loop for its whole life; a successful unmount ends that loop.
        """
        await self._retry.wait()
        assert self.mountpoint is not None
        while True:
            await trio.sleep(RETRY_INTERVAL)
            async with self._lock:
                if self.stopping:
                    return
                outcome = await self._unmount(self.mountpoint, name_holders=False)
                if outcome.stopping:
                    log.info("%s: no longer in use, unmounted", self.mountpoint)
                    self.stopping = True
                    return
                if not outcome.busy:  # gone from the table, or failing otherwise: stop trying
                    why = "; ".join(outcome.reasons)
                    log.warning("%s: not retrying the unmount: %s", self.mountpoint, why)
                    return

    async def write_out(self) -> None:
        """Write out and sync every disk, telling systemd to wait while it takes.

        Raises:
            VhdfsError: A disk could not be written out (all are tried).
        """
        failure: VhdfsError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_manager_waiting)
            for disk in self.disks:
                try:
                    await disk.flush(durable=True)
                except VhdfsError as exc:
                    failure = failure or exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _keep_manager_waiting(self) -> None:
        while True:
            self.notifier.send(EXTEND_TIMEOUT_USEC=_EXTEND_SECONDS * 1_000_000)
            await trio.sleep(_EXTEND_SECONDS / 3)

    async def _unmount(self, mountpoint: str, *, name_holders: bool = True) -> StopOutcome:
        """A normal (not lazy) unmount by ``fusermount3 -u``.

        ``name_holders``: look up who holds a busy mount (a scan of /proc) for the answer.
        """
        replaced = mount_replaced(mountpoint, self.device)
        if replaced is not None:
            return replaced
        try:
            result = await trio.run_process(
                ["fusermount3", "-u", mountpoint],
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )
        except OSError as exc:
            return StopOutcome(False, False, (f"cannot run fusermount3: {exc.strerror}",))
        return unmount_outcome(mountpoint, result.returncode, result.stderr, name_holders)


def mount_replaced(mountpoint: str, device: str | None) -> StopOutcome | None:
    """A refusal if the mount at ``mountpoint`` is not (any more) the one of ``device``.

    After ``umount -l`` another mount may sit there: it must never be unmounted for us.
    """
    here = top_mount_at(mountpoint, resolved=True)
    if here is None or (device is not None and here.device != device):
        return StopOutcome(False, False, (f"the mount at {mountpoint} is not this one any more",))
    return None


def unmount_outcome(
    mountpoint: str, returncode: int, stderr: bytes, name_holders: bool = True
) -> StopOutcome:
    """What ``fusermount3 -u mountpoint`` achieved, from its status and messages.

    ``name_holders``: look up who holds a busy mount (a scan of /proc) for the answer.
    """
    if returncode == 0:
        return StopOutcome(True)
    message = stderr.decode(errors="replace").strip()
    if "busy" in message:
        if not name_holders:
            return StopOutcome(False, True)
        named = holders(mountpoint) or ["a holder not visible to this user"]
        return StopOutcome(False, True, tuple(named))
    return StopOutcome(False, False, (message or f"fusermount3 exited {returncode}",))
