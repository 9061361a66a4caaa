"""mount(8), mount.fuse3 and /etc/fstab: every word they pass, uid/gid/umask, an awkward image
path through `mount -a` (twice) and `umount IMAGE`, and drop_privileges."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import run
from tests.support.mounting import VHDFS, is_mounted, wait_pid
from vhdfs.image.create import create_dynamic

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
#: mount.fuse3 starts the file system program through the shell's PATH.
ENV = {**os.environ, "PATH": f"{os.path.dirname(VHDFS)}:{os.environ['PATH']}"}


@pytest.fixture(autouse=True)
def _installed_is_this_checkout() -> None:
    # mount.fuse3 finds vhdfs on a fixed PATH: scripts/setup.sh links it into /usr/local/bin.
    installed = os.path.realpath("/usr/local/bin/vhdfs")
    assert installed == os.path.realpath(VHDFS), f"/usr/local/bin/vhdfs is {installed}: run setup"


def _mount(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", *map(str, argv)], capture_output=True, text=True, timeout=60, env=ENV
    )


def _mounts_at(mountpoint: Path) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(line.split()[4] == str(mountpoint) for line in f)


@pytest.fixture
def cleanup() -> Iterator[list[tuple[Path, Path]]]:
    """(mountpoint, pidfile) pairs to unmount and wait for, whatever the test did."""
    started: list[tuple[Path, Path]] = []
    yield started
    for mountpoint, pidfile in started:
        pid = int(pidfile.read_text()) if pidfile.exists() else None
        while is_mounted(str(mountpoint)):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        if pid is not None:
            wait_pid(pid, 30)


def _pid(pidfile: Path) -> int:
    return int(pidfile.read_text())


def test_mount_passes_fstab_words_and_ownership(
    tmp_path: Path, cleanup: list[tuple[Path, Path]]
) -> None:
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), 4 * MiB)
    mountpoint, pidfile = tmp_path / "mnt", tmp_path / "vhdfs.pid"
    mountpoint.mkdir()
    cleanup.append((mountpoint, pidfile))
    words = "defaults,rw,lazytime,dirsync,silent,loud,group,owner,nofail,_netdev,x-systemd.x=1"
    options = f"{words},comment=hi,uid=1234,gid=100,umask=027,pidfile={pidfile}"
    result = _mount("-t", "fuse.vhdfs", "-o", options, image, mountpoint)
    assert (result.returncode, result.stderr) == (0, "")
    pid = _pid(pidfile)
    raw = mountpoint / "disk.raw"
    st = raw.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 100, 0o640)
    assert mountpoint.stat().st_mode & 0o777 == 0o750
    for change in (lambda: os.chmod(raw, 0o666), lambda: os.chown(raw, 0, 0)):
        with pytest.raises(PermissionError) as caught:
            change()
        assert caught.value.errno == errno.EPERM
    run(["umount", mountpoint])
    assert wait_pid(pid, 30) == 0


def test_fstab_mount_all_twice_and_umount_by_image(
    tmp_path: Path, cleanup: list[tuple[Path, Path]]
) -> None:
    folder = tmp_path / "VM images, ü"
    folder.mkdir()
    image = folder / "Kind ü\\1.vhd"
    create_dynamic(str(image), 4 * MiB)
    mountpoint, pidfile = tmp_path / "mnt", tmp_path / "vhdfs.pid"
    mountpoint.mkdir()
    cleanup.append((mountpoint, pidfile))
    source = str(image).replace("\\", "\\134").replace(" ", "\\040")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{source} {mountpoint} fuse.vhdfs rw,nofail,pidfile={pidfile} 0 0\n")
    for _ in range(2):
        result = _mount("-a", "-T", fstab)
        assert (result.returncode, result.stderr) == (0, "")
        assert _mounts_at(mountpoint) == 1
    with open("/proc/self/mountinfo") as f:
        [line] = [line for line in f if line.split()[4] == str(mountpoint)]
    assert line.split(" - ")[1].split()[1] == source  # the kernel's own escaping
    pid = _pid(pidfile)
    run(["umount", image])
    assert wait_pid(pid, 30) == 0
    assert not is_mounted(str(mountpoint))


def test_drop_privileges_serves_the_handed_over_device(
    tmp_path: Path, cleanup: list[tuple[Path, Path]]
) -> None:
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), 4 * MiB)
    mountpoint, pidfile = tmp_path / "mnt", tmp_path / "vhdfs.pid"
    mountpoint.mkdir()
    cleanup.append((mountpoint, pidfile))
    options = f"drop_privileges,rw,default_permissions,pidfile={pidfile}"
    result = _mount("-t", "fuse.vhdfs", "-o", options, image, mountpoint)
    assert (result.returncode, result.stderr) == (0, "")
    pid = _pid(pidfile)
    raw = mountpoint / "disk.raw"
    with open(raw, "r+b") as f:
        f.write(b"written through a handed-over device")
    assert raw.read_bytes()[:36] == b"written through a handed-over device"
    run(["umount", mountpoint])
    assert wait_pid(pid, 30) == 0


def test_a_drop_privileges_mount_stops_as_any_mount_does(
    tmp_path: Path, cleanup: list[tuple[Path, Path]]
) -> None:
    # Its daemon has no capability left, so it may not unmount: vhdfs -u unmounts for it once
    # it has written out, and a SIGTERM writes out and serves on instead of leaving a dead mount.
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), 4 * MiB)
    mountpoint, pidfile = tmp_path / "mnt", tmp_path / "vhdfs.pid"
    mountpoint.mkdir()
    cleanup.append((mountpoint, pidfile))
    options = f"drop_privileges,rw,writeback=3600,pidfile={pidfile}"
    data = os.urandom(MiB)

    assert _mount("-t", "fuse.vhdfs", "-o", options, image, mountpoint).returncode == 0
    with open(mountpoint / "disk.raw", "r+b") as f:
        f.write(data)  # held in memory: the stop must write it out
    pid = _pid(pidfile)
    result = subprocess.run([VHDFS, "-u", mountpoint], capture_output=True, text=True, timeout=90)
    assert (result.returncode, result.stderr) == (0, "")
    assert not is_mounted(str(mountpoint))
    assert wait_pid(pid, 30) == 0

    assert _mount("-t", "fuse.vhdfs", "-o", options, image, mountpoint).returncode == 0
    pid = _pid(pidfile)
    with open(mountpoint / "disk.raw", "r+b") as f:
        assert f.read(MiB) == data
        f.write(data[::-1])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _written_out(image, MiB, data[::-1]) is False and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _written_out(image, MiB, data[::-1])
    assert wait_pid(pid, 0.5) is None  # serving on
    assert (mountpoint / "disk.raw").read_bytes()[MiB : 2 * MiB] == data[::-1]
    run(["umount", mountpoint])
    assert wait_pid(pid, 30) == 0


def _written_out(image: Path, offset: int, data: bytes) -> bool:
    """Whether the image file itself holds ``data`` at ``offset`` of its disk (qemu-img)."""
    target = image.with_suffix(".check.raw")
    run(["qemu-img", "convert", "-U", "-f", "vpc", "-O", "raw", image, target])
    try:
        with open(target, "rb") as f:
            f.seek(offset)
            return f.read(len(data)) == data
    finally:
        target.unlink()


def test_missing_image_under_mount(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    missing = tmp_path / "missing.vhd"
    result = _mount("-t", "fuse.vhdfs", missing, mountpoint)
    assert result.returncode != 0
    assert f"vhdfs: {missing}: cannot open: no such file (it is missing)" in result.stderr
    assert not is_mounted(str(mountpoint))
