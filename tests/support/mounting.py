"""Real vhdfs mounts for tests, torn down reliably.

``Mount.start`` runs the real ``vhdfs`` command. Without ``-f`` it daemonizes and returns when
the mount is ready; the daemon's PID comes from ``-o pidfile=``, and because the test process
is a child subreaper (see conftest) the orphaned daemon is our child, so its exit status can be
collected. With ``foreground=True`` the process is ours directly.

``Mount.stop`` unmounts with ``fusermount3 -u`` and waits for that PID and its exit status. If
anything fails it escalates (lazy unmount, SIGTERM, SIGKILL), always to that one PID only, and
the original failure is reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

VHDFS = os.path.join(os.path.dirname(sys.executable), "vhdfs")
VHD = os.path.join(os.path.dirname(sys.executable), "vhd")


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Inherit orphaned daemons: a daemonized vhdfs then stays our child, so its PID can be
    waited for and its exit status collected."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def vhdfs_command() -> list[str]:
    """The installed ``vhdfs`` script, or the module when running from a source tree."""
    return [VHDFS] if os.path.exists(VHDFS) else [sys.executable, "-m", "vhdfs"]


def vhd_command() -> list[str]:
    """The installed ``vhd`` script, or its module."""
    return [VHD] if os.path.exists(VHD) else [sys.executable, "-m", "vhdfs.cli.vhd_cmd"]


def is_mounted(path: str) -> bool:
    """True when ``path`` is a mountpoint according to /proc/self/mountinfo."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint == target:
                return True
    return False


def wait_pid(pid: int, timeout: float) -> int | None:
    """Wait for our child ``pid``; return its exit status, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


class MountFailed(AssertionError):
    """The vhdfs command did not mount."""


class Mount:
    """One vhdfs mount of ``images`` on ``mountpoint``."""

    def __init__(
        self,
        images: Sequence[str],
        mountpoint: str,
        options: Sequence[str] = (),
        *,
        foreground: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cwd = cwd
        self.env = None if env is None else {**os.environ, **env}
        self.images = list(images)
        self.mountpoint = mountpoint
        self.options = list(options)
        self.foreground = foreground
        self.pid: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr = b""
        self.returncode: int | None = None

    @property
    def pidfile(self) -> str:
        """Where a daemonized mount writes its PID (``-o pidfile=``)."""
        return self.mountpoint.rstrip("/") + ".pid"

    def argv(self) -> list[str]:
        argv = vhdfs_command()
        if self.foreground:
            argv.append("-f")
        else:
            argv += ["-o", f"pidfile={self.pidfile}"]
        for option in self.options:
            argv += ["-o", option]
        return argv + self.images + [self.mountpoint]

    def start(self) -> Mount:
        if self.foreground:
            self.process = subprocess.Popen(
                self.argv(), stderr=subprocess.PIPE, cwd=self.cwd, env=self.env
            )
            self.pid = self.process.pid
            deadline = time.monotonic() + 30
            while not is_mounted(self.mountpoint):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stderr = self.process.communicate(timeout=10)[1]
                    raise MountFailed(f"vhdfs -f did not mount: {self.stderr.decode()}")
                time.sleep(0.02)
            return self
        result = subprocess.run(
            self.argv(), capture_output=True, timeout=60, cwd=self.cwd, env=self.env
        )
        self.stderr = result.stderr
        self.returncode = result.returncode
        if result.returncode != 0:
            raise MountFailed(f"vhdfs exited {result.returncode}: {result.stderr.decode().strip()}")
        with open(self.pidfile) as f:
            self.pid = int(f.read())
        return self

    def raw(self, name: str | None = None) -> str:
        """Path of a raw file in a directory mount, or the mountpoint itself (single file)."""
        if name is None:
            return self.mountpoint
        return os.path.join(self.mountpoint, name)

    def stop(self, timeout: float = 60) -> int:
        """Unmount and return the daemon's exit status."""
        assert self.pid is not None
        pid, self.pid = self.pid, None
        result = subprocess.run(
            ["fusermount3", "-u", self.mountpoint], capture_output=True, timeout=60
        )
        status = self._wait(pid, timeout) if result.returncode == 0 else None
        if status is None:
            self._force(pid)
            raise AssertionError(
                f"unmount of {self.mountpoint} failed: {result.stderr.decode().strip()} "
                f"{self.stderr.decode()}"
            )
        return status

    def wait_exited(self, timeout: float = 30) -> int | None:
        """Wait for the daemon to exit by itself (after a signal); return its status."""
        assert self.pid is not None
        status = self._wait(self.pid, timeout)
        if status is not None:
            self.pid = None
        return status

    def _wait(self, pid: int, timeout: float) -> int | None:
        if self.process is not None:
            try:
                _, err = self.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
            self.stderr += err
            return self.process.returncode
        return wait_pid(pid, timeout)

    def _force(self, pid: int) -> None:
        subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if self._wait(pid, 10) is not None:
                return

    def cleanup(self) -> None:
        """Teardown path: stop if still running and make sure nothing stays mounted, even
        when the daemon already died; never raises over a test failure."""
        if self.pid is not None:
            pid = self.pid
            try:
                self.stop(timeout=30)
            except AssertionError:
                self._force(pid)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)


def read_with_vhdimount(image: str, mountpoint: str) -> bytes:
    """The whole disk of ``image`` as libvhdi's vhdimount serves it.

    vhdimount serves one file per layer of a chain, ``vhdi1`` being the base and the highest
    number the leaf; the leaf is the disk. It runs in the foreground (``-v``) so this function
    owns its PID; it is always unmounted and waited for, and killed (that PID only) if it does
    not exit.
    """
    process = subprocess.Popen(
        ["vhdimount", "-v", image, mountpoint],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    raw = os.path.join(mountpoint, "vhdi1")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(raw):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"vhdimount did not mount {image}: {process.communicate()[1].decode()}"
                )
            time.sleep(0.02)
        names = sorted(os.listdir(mountpoint), key=lambda name: int(name[len("vhdi") :]))
        with open(os.path.join(mountpoint, names[-1]), "rb") as f:
            return f.read()
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@contextlib.contextmanager
def mount_factory(folder: Path) -> Iterator[Callable[..., Mount]]:
    """A factory for real mounts (mountpoints ``folder/mntN`` unless given); every mount it
    started is torn down on the way out. The tests' ``mount`` fixture and the campaigns use it."""
    started: list[Mount] = []
    counter = iter(range(1_000_000))

    def start(
        images: Sequence[str | Path],
        mountpoint: str | Path | None = None,
        options: Sequence[str] = (),
        *,
        foreground: bool = False,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Mount:
        if mountpoint is None:
            mountpoint = folder / f"mnt{next(counter)}"
            mountpoint.mkdir()
        m = Mount(
            [str(i) for i in images],
            str(mountpoint),
            options,
            foreground=foreground,
            cwd=None if cwd is None else str(cwd),
            env=env,
        )
        started.append(m)
        return m.start()

    try:
        yield start
    finally:
        for m in started:
            m.cleanup()
