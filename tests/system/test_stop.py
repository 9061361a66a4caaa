"""Stopping never loses data: SIGTERM while a loop device and a guest ext4 use the raw file,
``vhdfs -u``, and mounting over a live or dead vhdfs mount."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhdfs
from tests.support.images import run
from tests.support.mounting import VHD, VHDFS, Mount, is_mounted, vhdfs_command, wait_pid
from tests.support.notify import NotifySocket
from vhdfs.daemon.shutdown import RETRY_INTERVAL
from vhdfs.image.create import create_dynamic

pytestmark = pytest.mark.fuse

MiB = 1 << 20
NOBODY = pwd.getpwnam("nobody")


def _vhdfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhdfs_command(), *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.root
def test_sigterm_while_a_guest_file_system_is_mounted_loses_nothing_and_ends_by_itself(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "guest.vhd"
    create_dynamic(str(image), 64 * MiB)
    notify = NotifySocket(tmp_path / "notify")
    m = mount([image], env={"NOTIFY_SOCKET": notify.path})
    raw = m.raw("guest.raw")
    guest = tmp_path / "guest"
    guest.mkdir()
    loop = run(["losetup", "--show", "-f", raw]).strip()
    rng = random.Random(5)
    before, after = rng.randbytes(3 * MiB), rng.randbytes(2 * MiB)
    try:
        run(["mkfs.ext4", "-q", loop])
        run(["mount", loop, guest])
        try:
            (guest / "before").write_bytes(before)
            os.sync()
            assert m.pid is not None
            os.kill(m.pid, signal.SIGTERM)
            notify.wait_for("STOPPING", "1")
            status = notify.wait_for("STATUS", "in use, unmounting once the holders let go*")[
                "STATUS"
            ]
            assert f"/dev/{Path(loop).name} is backed by {raw}" in status
            assert is_mounted(m.mountpoint)
            # The guest goes on writing, and it lands.
            (guest / "after").write_bytes(after)
            os.sync()
            assert (guest / "before").read_bytes() == before
        finally:
            run(["umount", guest])
    finally:
        run(["losetup", "-d", loop])
    # One SIGTERM is enough: once the holders have let go the daemon unmounts and exits.
    assert m.wait_exited() == 0
    assert not is_mounted(m.mountpoint)
    notify.close()

    again = mount([image], options=["ro"])
    loop = run(["losetup", "-r", "--show", "-f", again.raw("guest.raw")]).strip()
    try:
        run(["fsck.ext4", "-fn", loop])
        run(["mount", "-o", "ro", loop, guest])
        try:
            assert (guest / "before").read_bytes() == before
            assert (guest / "after").read_bytes() == after
        finally:
            run(["umount", guest])
    finally:
        run(["losetup", "-d", loop])
    assert again.stop() == 0


def test_unmount_waits_for_the_daemon_and_names_holders(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 8 * MiB)
    m = mount([image], options=["writeback=3600"])
    raw = m.raw("d.raw")
    fd = os.open(raw, os.O_RDWR)
    data = random.Random(2).randbytes(MiB)
    try:
        os.pwrite(fd, data, MiB)  # held in memory: nothing forces it out
        busy = _vhdfs("-u", m.mountpoint)
        assert busy.returncode == 6
        assert busy.stderr == (
            f"vhdfs: {m.mountpoint}: in use, nothing unmounted: PID {os.getpid()} "
            f"({Path(f'/proc/{os.getpid()}/comm').read_text().strip()}) has {raw} open\n"
        )
        assert is_mounted(m.mountpoint)
    finally:
        os.close(fd)
    pid = m.pid
    assert pid is not None
    done = _vhdfs("-u", m.mountpoint)
    assert (done.returncode, done.stderr) == (0, "")
    # Returned only once the daemon had exited: its exit status is there to collect.
    assert wait_pid(pid, 0) == 0
    m.pid = None
    assert not is_mounted(m.mountpoint)
    again = mount([image], options=["ro"])
    with open(again.raw("d.raw"), "rb") as f:
        assert os.pread(f.fileno(), MiB, MiB) == data
    assert again.stop() == 0


def test_mounting_over_a_vhdfs_mount_is_refused(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 8 * MiB)
    m = mount([image], options=["ro"])
    second = _vhdfs("-o", "ro", image, m.mountpoint)
    assert (second.returncode, second.stderr) == (
        5,
        f"vhdfs: {m.mountpoint}: already holds a vhdfs mount of {image}; unmount it first "
        f"(vhdfs -u {m.mountpoint})\n",
    )
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_exited() == -signal.SIGKILL
    dead = _vhdfs("-o", "ro", image, m.mountpoint)
    hint = f"remove it with fusermount3 -u {m.mountpoint}"
    assert (dead.returncode, dead.stderr) == (
        5,
        f"vhdfs: {m.mountpoint}: holds a dead vhdfs mount (its daemon is gone); {hint}\n",
    )
    unmount = _vhdfs("-u", m.mountpoint)
    assert (unmount.returncode, unmount.stderr) == (
        5,
        f"vhdfs: {m.mountpoint}: its daemon is gone (the mount is dead); {hint}\n",
    )
    run(["fusermount3", "-u", m.mountpoint])


def test_missing_image_says_it_is_missing(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for options in ([], ["-o", "rw"]):
        result = _vhdfs(*options, tmp_path / "missing.vhd", mountpoint)
        assert (result.returncode, result.stderr) == (
            3,
            f"vhdfs: {tmp_path / 'missing.vhd'}: cannot open: no such file (it is missing)\n",
        )


@contextmanager
def _passable_by_others(*paths: Path) -> Iterator[None]:
    """Let other users pass through (not list) the folders above *paths* while the block runs.

    A clone made under ``mktemp -d`` sits in a folder only root may enter, where no other user
    could run the vhdfs installed inside it; an installed vhdfs is always within their reach."""
    modes: dict[Path, int] = {}
    try:
        for path in paths:
            for folder in path.parents:
                mode = stat.S_IMODE(folder.stat().st_mode)
                if folder not in modes and not mode & stat.S_IXOTH:
                    modes[folder] = mode
                    os.chmod(folder, mode | stat.S_IXOTH)
        yield
    finally:
        for folder, mode in modes.items():
            os.chmod(folder, mode)


@pytest.mark.root
def test_a_user_mounts_and_unmounts_without_root(tmp_path: Path) -> None:
    # Everything as "nobody": the FUSE mount through the setuid fusermount3, vhdfs -u through
    # the control socket (which admits the daemon's own user).
    folder = Path(tempfile.mkdtemp(prefix="vhdfs-user-"))
    with _passable_by_others(Path(VHD), Path(vhdfs.__file__)):
        # Debian's udev rule makes /dev/fuse 0666; some containers leave it 0600.
        fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
        try:
            os.chmod("/dev/fuse", 0o666)
            os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)
            as_nobody = ["runuser", "-u", "nobody", "--"]

            def run_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*as_nobody, *argv], capture_output=True, text=True, timeout=120, cwd=folder
                )

            reachable = run_as_nobody("test", "-x", VHD)
            assert reachable.returncode == 0, (
                f"{VHD} is not executable by other users, though they may pass through every "
                "folder above it (this test needs it as any user running vhdfs would)"
            )
            assert run_as_nobody(VHD, "create", "disk.vhd", "8M").returncode == 0
            assert run_as_nobody("mkdir", "mnt").returncode == 0
            mounted = run_as_nobody(VHDFS, "disk.vhd", "mnt")
            assert (mounted.returncode, mounted.stderr) == (0, "")
            # Without allow_other only the mounting user may look into the mount, root included.
            raw = folder / "mnt" / "disk.raw"
            assert run_as_nobody("stat", "-c", "%U", str(raw)).stdout == "nobody\n"
            written = run_as_nobody("dd", "if=/dev/urandom", f"of={raw}", "bs=64k", "count=4",
                                    "conv=notrunc,fsync")  # fmt: skip
            assert written.returncode == 0, written.stderr
            unmounted = run_as_nobody(VHDFS, "-u", "mnt")
            assert (unmounted.returncode, unmounted.stderr) == (0, "")
            assert not is_mounted(str(folder / "mnt"))
            checked = run_as_nobody(VHD, "check", "disk.vhd")
            assert checked.returncode == 0, checked.stdout
        finally:
            if is_mounted(str(folder / "mnt")):
                subprocess.run(["fusermount3", "-u", "-z", folder / "mnt"], capture_output=True)
            shutil.rmtree(folder)
            os.chmod("/dev/fuse", fuse_mode)


def test_a_retrying_stop_leaves_a_new_mount_at_its_mountpoint_alone(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    # A stop signal found the mount busy, so its daemon retries the unmount. The administrator
    # detaches it lazily and mounts another image there: the old daemon must not unmount that.
    first, second = tmp_path / "first.vhd", tmp_path / "second.vhd"
    create_dynamic(str(first), 8 * MiB)
    create_dynamic(str(second), 8 * MiB)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    notify = NotifySocket(tmp_path / "notify")
    old = mount([first], mountpoint, env={"NOTIFY_SOCKET": notify.path})
    holder = os.open(old.raw("first.raw"), os.O_RDONLY)
    try:
        assert old.pid is not None
        os.kill(old.pid, signal.SIGTERM)
        notify.wait_for("STATUS", "in use, unmounting once the holders let go*")
        run(["umount", "-l", mountpoint])
        new = mount([second], mountpoint)
        time.sleep(3 * RETRY_INTERVAL)  # three retries of the old daemon, had it kept trying
        assert is_mounted(str(mountpoint))
        assert os.listdir(mountpoint) == ["second.raw"]
    finally:
        os.close(holder)
    # The detached mount's last holder let go: its session ends and the old daemon exits.
    assert old.wait_exited() == 0
    assert new.stop() == 0
    notify.close()
