"""The host failing under a mount: disk errors, a file system gone read-only, files moved.

The image lives on ``faultyfs`` (tests/support/faultyfs.py), a FUSE pass-through that returns
real errors on command, so vhdfs's own pread, pwrite and fdatasync calls fail as they would on
a failing disk. Each time: the application sees the error on its write or fsync, what an fsync
acknowledged before is intact, the daemon keeps serving reads, and afterwards the image opens
cleanly in vhdfs, qemu-img and vhdimount.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.faultyfs import running
from tests.support.images import Layer, build_chain, pattern, run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command
from vhdfs.errors import ExitCode
from vhdfs.image.create import create_differencing

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = 8 * MiB


@dataclass
class FaultyDisk:
    """The faulty file system: where images go, and the switch for its errors."""

    backing: Path
    mountpoint: Path
    control: Path
    _stamp: float = 0.0

    def fail(self, **faults: str) -> None:
        """Make the named operations fail with the given errno names (none: all succeed)."""
        text = "".join(f"{operation}={code}\n" for operation, code in faults.items())
        self.control.write_text(text)
        # The file system notices a change by mtime, which may not move between two writes
        # within one clock tick: set it to a value never used before.
        self._stamp = max(self._stamp + 1, time.time())
        os.utime(self.control, (self._stamp, self._stamp))


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[FaultyDisk]:
    disk = FaultyDisk(tmp_path / "backing", tmp_path / "faulty", tmp_path / "faults")
    disk.backing.mkdir()
    disk.mountpoint.mkdir()
    disk.control.write_text("")
    with running(disk.backing, disk.mountpoint, disk.control):
        yield disk


def _dynamic(disk: FaultyDisk) -> tuple[Path, bytearray]:
    """A dynamic image with its first 2 MiB block allocated and the rest unallocated."""
    built = build_chain(disk.backing, SIZE, [Layer(writes=[(0, 4096)])])
    return disk.mountpoint / built.leaf.name, built.expected


def _open_raw(m: Mount, image: Path) -> int:
    return os.open(m.raw(image.stem + ".raw"), os.O_RDWR)


def _read_fresh(fd: int, offset: int, length: int) -> bytes:
    """Read through the mount with the page cache dropped first, so the daemon answers.

    On a descriptor kept open: closing one makes the daemon write its dirty data out, which
    fails while the host does.
    """
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, length, offset)


def _valid_everywhere(image: Path, mount: Callable[..., Mount], tmp_path: Path) -> bytes:
    """``vhd check`` finds nothing worse than leaks; vhdfs, qemu-img and vhdimount agree."""
    checked = subprocess.run([*vhd_command(), "check", image], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    m = mount([image], options=["ro"])
    ours = Path(m.raw(image.stem + ".raw")).read_bytes()
    assert m.stop() == 0
    qemu = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, qemu])
    assert qemu.read_bytes() == ours
    vhdi = tmp_path / "vhdi"
    vhdi.mkdir(exist_ok=True)
    assert read_with_vhdimount(str(image), str(vhdi)) == ours
    return ours


def test_write_errors_reach_the_application_and_lose_nothing_acknowledged(
    faulty: FaultyDisk, mount: Callable[..., Mount], tmp_path: Path
) -> None:
    image, model = _dynamic(faulty)
    m = mount([image], options=["writeback=60"])
    fd = _open_raw(m, image)
    acknowledged = pattern(1, 8192)
    os.pwrite(fd, acknowledged, 4096)
    os.fsync(fd)
    model[4096 : 4096 + 8192] = acknowledged

    faulty.fail(write="EIO")
    # Into the allocated block: written in place at once, so the write itself fails.
    with pytest.raises(OSError, match="Input/output error") as in_place:
        os.pwrite(fd, pattern(2, 4096), 16384)
    assert in_place.value.errno == errno.EIO
    # Into an unallocated block: held in memory, so the fsync that commits it fails.
    staged = pattern(3, 65536)
    os.pwrite(fd, staged, 3 * MiB)
    with pytest.raises(OSError, match="Input/output error") as on_fsync:
        os.fsync(fd)
    assert on_fsync.value.errno == errno.EIO
    # The daemon still serves reads, of the image and of the data it keeps.
    assert _read_fresh(fd, 4096, 8192) == acknowledged
    assert _read_fresh(fd, 3 * MiB, 65536) == staged

    faulty.fail()
    os.fsync(fd)  # the kept data goes in now
    model[3 * MiB : 3 * MiB + 65536] = staged
    os.close(fd)
    assert m.stop() == 0
    assert _valid_everywhere(image, mount, tmp_path) == bytes(model)


def test_a_failed_sync_is_reported_and_never_forgotten(
    faulty: FaultyDisk, mount: Callable[..., Mount], tmp_path: Path
) -> None:
    image, model = _dynamic(faulty)
    m = mount([image], options=["writeback=60"])
    fd = _open_raw(m, image)
    acknowledged = pattern(4, 4096)
    os.pwrite(fd, acknowledged, 8192)
    os.fsync(fd)
    model[8192:12288] = acknowledged

    faulty.fail(fsync="EIO")
    os.pwrite(fd, pattern(5, 4096), 5 * MiB)
    with pytest.raises(OSError, match="Input/output error") as first:
        os.fsync(fd)
    assert first.value.errno == errno.EIO
    faulty.fail()
    # The kernel may have dropped the pages it could not write: a later sync that succeeded
    # would hide that, so every later fsync fails too.
    with pytest.raises(OSError, match="Input/output error") as again:
        os.fsync(fd)
    assert again.value.errno == errno.EIO
    assert _read_fresh(fd, 8192, 4096) == acknowledged
    with pytest.raises(OSError, match="Input/output error"):
        os.close(fd)  # close writes dirty data out: refused the same way (the fd is closed)
    # The final write-out could not be made durable, and the exit status says so.
    assert m.stop() == ExitCode.IO_ERROR
    ours = _valid_everywhere(image, mount, tmp_path)
    assert ours[8192:12288] == acknowledged
    # The unsynced write may or may not be there; everything else is as acknowledged.
    assert ours[: 5 * MiB] == bytes(model[: 5 * MiB])
    assert ours[5 * MiB + 4096 :] == bytes(model[5 * MiB + 4096 :])


def test_read_errors_fail_the_read_only(faulty: FaultyDisk, mount: Callable[..., Mount]) -> None:
    image, model = _dynamic(faulty)
    m = mount([image], options=["ro"])
    fd = os.open(m.raw(image.stem + ".raw"), os.O_RDONLY)
    faulty.fail(read="EIO")
    with pytest.raises(OSError, match="Input/output error") as failed:
        _read_fresh(fd, 0, 4096)
    assert failed.value.errno == errno.EIO
    faulty.fail()
    assert _read_fresh(fd, 0, 4096) == bytes(model[:4096])
    os.close(fd)
    assert m.stop() == 0


def test_a_file_system_gone_read_only(
    faulty: FaultyDisk, mount: Callable[..., Mount], tmp_path: Path
) -> None:
    image, model = _dynamic(faulty)
    m = mount([image], options=["writeback=60"])
    fd = _open_raw(m, image)
    faulty.fail(write="EROFS", fsync="EROFS")
    # Into the allocated block: written in place at once, so the write itself is refused.
    with pytest.raises(OSError, match="Read-only file system") as refused:
        os.pwrite(fd, pattern(6, 4096), 0)
    assert refused.value.errno == errno.EROFS
    # Into an unallocated block: held in memory, so the fsync that commits it is refused.
    staged = pattern(9, 65536)
    os.pwrite(fd, staged, 3 * MiB)
    with pytest.raises(OSError, match="Read-only file system") as on_fsync:
        os.fsync(fd)
    assert on_fsync.value.errno == errno.EROFS
    assert _read_fresh(fd, 0, 4096) == bytes(model[:4096])
    assert _read_fresh(fd, 3 * MiB, 65536) == staged
    faulty.fail()
    os.fsync(fd)  # writable again: the kept data goes in
    model[3 * MiB : 3 * MiB + 65536] = staged
    os.close(fd)
    assert m.stop() == 0
    assert _valid_everywhere(image, mount, tmp_path) == bytes(model)


def test_the_kernel_refuses_a_read_only_remount_under_a_writable_mount(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    host = tmp_path / "host"
    host.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", host])
    m = None
    try:
        built = build_chain(host, SIZE, [Layer(writes=[(0, 64)])])
        m = mount([built.leaf])
        remount = subprocess.run(
            ["mount", "-o", "remount,ro", host], capture_output=True, text=True
        )
        # vhdfs holds the image open for writing, so the host file system cannot go
        # read-only under it (EBUSY): no write can be stranded that way.
        assert remount.returncode != 0
        assert "busy" in remount.stderr.lower()
        with open(m.raw(built.leaf.stem + ".raw"), "r+b") as f:
            f.write(pattern(7, 4096))
            os.fsync(f.fileno())
        assert m.stop() == 0
    finally:
        if m is not None:
            m.cleanup()  # before the umount, which a live mount would make fail
        run(["umount", host])


def test_images_renamed_replaced_and_deleted_while_mounted(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    folder = tmp_path / "images"
    built = build_chain(folder, SIZE, [Layer(writes=[(0, 4096)])])
    parent = built.leaf
    child = folder / "child.vhd"
    create_differencing(str(child), str(parent), 512 << 10)
    m = mount([child])
    raw = m.raw("child.raw")
    # Both files move away and a different image takes the parent's name: vhdfs uses the
    # descriptors it opened, never the paths again.
    parent.rename(folder / "moved-parent.vhd")
    child.rename(folder / "moved-child.vhd")
    build_chain(tmp_path / "other", SIZE, [Layer(writes=[(0, 8192)])], seed=9).leaf.rename(parent)
    written = pattern(8, 65536)
    with open(raw, "r+b") as f:
        assert _read_fresh(f.fileno(), 0, 65536) == bytes(built.expected[:65536])
        f.seek(MiB)
        f.write(written)
        os.fsync(f.fileno())
    assert m.stop() == 0
    (folder / "moved-parent.vhd").rename(parent)  # back where the child's locator points
    m = mount([folder / "moved-child.vhd"], options=["ro"])
    data = Path(m.raw("moved-child.raw")).read_bytes()
    assert data[MiB : MiB + 65536] == written
    assert data[:65536] == bytes(built.expected[:65536])
    assert m.stop() == 0

    # Deleted while mounted: the daemon keeps serving, writing and syncing the open file.
    m = mount([folder / "moved-child.vhd"])
    (folder / "moved-child.vhd").unlink()
    with open(m.raw("moved-child.raw"), "r+b") as f:
        f.seek(2 * MiB)
        f.write(written)
        os.fsync(f.fileno())
        f.seek(MiB)
        assert f.read(65536) == written
    assert m.stop() == 0
