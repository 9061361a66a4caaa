"""Writes through real mounts: interop afterwards, the raw file's block-device behaviour,
durability of close and write-through, read-only fallbacks, locks, overlays."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.files import sha256_file
from tests.support.images import Layer, build_chain, pattern, run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command, vhdfs_command
from tests.support.notify import NotifySocket
from tests.support.vhdwrite import rewrite_footers
from vhdfs.image.create import create_differencing, create_dynamic, create_fixed

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = 12 * MiB


def _image(tmp_path: Path, kind: str) -> tuple[Path, bytearray]:
    """A fresh image of ``kind`` (a differencing one on a base holding data), and its bytes."""
    folder = tmp_path / "images"
    if kind == "differencing":
        built = build_chain(folder, SIZE, [Layer(writes=[(0, 2048), (8192, 100)])])
        child = folder / "child.vhd"
        create_differencing(str(child), str(built.leaf), 512 << 10)
        return child, built.expected
    built = build_chain(folder, SIZE, [Layer(kind=kind)])
    return built.leaf, built.expected


# Writes in whole 4 KiB pages, so libvhdi's bug with partial bitmap bytes cannot matter.
ALIGNED_WRITES = [(0, 8192), (MiB - 4096, 12288), (5 * MiB, 3 * MiB), (SIZE - 4096, 4096)]


def _write_all(raw: str, model: bytearray, writes: list[tuple[int, int]], seed: int) -> None:
    fd = os.open(raw, os.O_WRONLY)
    try:
        for number, (offset, length) in enumerate(writes):
            data = pattern(seed + number, length)
            assert os.pwrite(fd, data, offset) == length
            model[offset : offset + length] = data
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
def test_written_images_read_the_same_everywhere(
    kind: str, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image, model = _image(tmp_path, kind)
    m = mount([image])
    _write_all(m.raw(image.stem + ".raw"), model, ALIGNED_WRITES, 100)
    assert m.stop() == 0
    assert run([*vhd_command(), "check", image]).endswith(
        "no errors in " + ("2 image(s)\n" if kind == "differencing" else "1 image(s)\n")
    )
    again = mount([image], options=["ro"])
    assert Path(again.raw(image.stem + ".raw")).read_bytes() == bytes(model)
    assert again.stop() == 0
    vhdi = tmp_path / "vhdi"
    vhdi.mkdir()
    assert read_with_vhdimount(str(image), str(vhdi)) == bytes(model)
    if kind != "differencing":  # QEMU does not support differencing images
        qemu = tmp_path / "qemu.raw"
        run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, qemu])
        assert qemu.read_bytes() == bytes(model)


def test_unaligned_and_zero_writes(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image, model = _image(tmp_path, "differencing")
    m = mount([image])
    raw = m.raw("child.raw")
    fd = os.open(raw, os.O_RDWR)
    try:
        # A 3-byte write inside a parent sector: the rest of the sector must be copied up.
        os.pwrite(fd, b"abc", 1001)
        model[1001:1004] = b"abc"
        # Zeros over parent data must be stored, not skipped (the parent has data there).
        os.pwrite(fd, bytes(5000), 8192 * 512 + 7)
        model[8192 * 512 + 7 : 8192 * 512 + 5007] = bytes(5000)
        os.fsync(fd)
        assert os.pread(fd, SIZE, 0) == bytes(model)
    finally:
        os.close(fd)
    assert m.stop() == 0
    again = mount([image], options=["ro"])
    assert Path(again.raw("child.raw")).read_bytes() == bytes(model)
    assert again.stop() == 0


def test_zero_writes_allocate_nothing_in_dynamic_images(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), SIZE)
    size_before = image.stat().st_size
    m = mount([image])
    with open(m.raw("d.raw"), "r+b") as f:
        f.write(bytes(4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    assert m.stop() == 0
    assert image.stat().st_size == size_before
    assert '"allocated_blocks": 0' in run([*vhd_command(), "info", "--json", image])


def test_raw_file_behaves_like_a_block_device(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = tmp_path / "f.vhd"
    create_fixed(str(image), MiB)
    m = mount([image])
    raw = m.raw("f.raw")
    fd = os.open(raw, os.O_RDWR)
    try:
        with pytest.raises(OSError, match="No space left on device") as caught:
            os.pwrite(fd, b"x", MiB)
        assert caught.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 100, MiB - 10) == 10  # cut short at the end
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.truncate(raw, 2 * MiB)
        os.truncate(raw, MiB)  # to its own size: nothing to change
        with pytest.raises(PermissionError):
            os.chmod(raw, 0o600)
        os.utime(raw)
    finally:
        os.close(fd)
    assert os.path.getsize(raw) == MiB
    assert m.stop() == 0


def test_data_is_in_the_image_once_close_returns(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), SIZE)
    m = mount([image], options=["writeback=3600"])
    data = pattern(5, 3 * MiB + 512)
    source = tmp_path / "source"
    source.write_bytes(data)
    # dd writes and closes, with no fsync: close() (FUSE flush) must put the data in the image.
    run(["dd", f"if={source}", f"of={m.raw('d.raw')}", "bs=64K", "seek=1", "conv=notrunc"])
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_exited() == -signal.SIGKILL
    subprocess.run(["fusermount3", "-u", m.mountpoint], check=True)
    again = mount([image], options=["ro"])
    assert Path(again.raw("d.raw")).read_bytes()[64 << 10 : (64 << 10) + len(data)] == data
    assert again.stop() == 0


def test_write_through_survives_a_kill_before_close(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image, model = _image(tmp_path, "differencing")
    m = mount([image], options=["sync"])
    fd = os.open(m.raw("child.raw"), os.O_WRONLY)
    data = pattern(9, 70_000)
    os.pwrite(fd, data, 12345)
    model[12345 : 12345 + len(data)] = data
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_exited() == -signal.SIGKILL
    with pytest.raises(OSError, match="Transport endpoint is not connected") as caught:
        os.close(fd)  # the flush of close() finds the daemon gone
    assert caught.value.errno == errno.ENOTCONN
    subprocess.run(["fusermount3", "-u", m.mountpoint], check=True)
    again = mount([image], options=["ro"])
    assert Path(again.raw("child.raw")).read_bytes() == bytes(model)
    assert again.stop() == 0


def _vhdfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhdfs_command(), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_second_writer_is_refused_naming_the_mount(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), SIZE)
    first = mount([image])
    other = tmp_path / "other"
    other.mkdir()
    result = _vhdfs(image, other)
    assert result.returncode == 6
    assert result.stderr == f"vhdfs: {image}: in use by the vhdfs mount at {first.mountpoint}\n"
    # QEMU honours the lock too.
    qemu = subprocess.run(
        ["qemu-io", "-f", "vpc", "-c", "write 0 512", str(image)], capture_output=True, text=True
    )
    assert qemu.returncode != 0
    assert "lock" in qemu.stderr
    assert first.stop() == 0


def test_read_only_mounts_share(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), SIZE)
    a = mount([image], options=["ro"])
    b = mount([image], options=["ro"])
    assert a.stop() == 0
    assert b.stop() == 0


@pytest.mark.root
def test_unwritable_image_falls_back_to_read_only(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    create_dynamic(str(store / "d.vhd"), SIZE)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    run(["mount", "--bind", store, readonly])
    try:
        run(["mount", "-o", "remount,ro,bind", readonly])
        image = readonly / "d.vhd"
        m = mount([image])
        assert m.stderr.decode() == (
            f"vhdfs: {image}: you cannot write to it; mounting it read-only\n"
        )
        assert os.stat(m.raw("d.raw")).st_mode & 0o222 == 0
        assert m.stop() == 0
        target = tmp_path / "mnt-rw"
        target.mkdir()
        result = _vhdfs("-o", "rw", image, target)
        assert result.returncode == 3
        assert result.stderr == (
            f"vhdfs: {image}: cannot mount read-write: you cannot write to it "
            "(mount it with -o ro)\n"
        )
    finally:
        run(["umount", readonly])


def test_saved_state_image_is_served_read_only(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = tmp_path / "saved.vhd"
    create_dynamic(str(image), SIZE)
    rewrite_footers(image, {84: b"\x01"})
    m = mount([image])
    assert "saved state is set" in m.stderr.decode()
    with pytest.raises(OSError, match="Read-only file system") as caught:
        os.open(m.raw("saved.raw"), os.O_WRONLY)
    assert caught.value.errno == errno.EROFS
    assert m.stop() == 0


def test_overlay_leaves_the_image_untouched(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    built = build_chain(tmp_path / "golden", SIZE, [Layer(writes=[(0, 4096), (10000, 64)])])
    golden = built.leaf
    golden_hash = sha256_file(golden)
    overlay = tmp_path / "golden" / "try.vhd"
    model = built.expected
    m = mount([golden], options=[f"overlay={overlay}"])
    raw = m.raw(golden.stem + ".raw")
    _write_all(raw, model, [(4096, 8192), (3 * MiB, MiB)], 300)
    assert m.stop() == 0
    assert sha256_file(golden) == golden_hash
    # The overlay is reused when mounted again, and is an ordinary child for other tools.
    result = _vhdfs("-o", f"overlay={overlay},ro", golden, tmp_path)
    assert (result.returncode, result.stderr) == (
        2,
        "vhdfs: overlay= mounts the overlay read-write; drop ro\n",
    )
    m2 = mount([golden], options=[f"overlay={overlay}"])
    assert Path(m2.raw(golden.stem + ".raw")).read_bytes() == bytes(model)
    assert m2.stop() == 0
    vhdi = tmp_path / "vhdi"
    vhdi.mkdir()
    assert read_with_vhdimount(str(overlay), str(vhdi)) == bytes(model)
    assert sha256_file(golden) == golden_hash


def test_overlay_of_another_image_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    create_dynamic(str(a), SIZE)
    create_dynamic(str(b), SIZE)
    overlay = tmp_path / "over.vhd"
    create_differencing(str(overlay), str(a))
    target = tmp_path / "mnt"
    target.mkdir()
    result = _vhdfs("-o", f"overlay={overlay}", b, target)
    assert result.returncode == 4
    assert result.stderr == f"vhdfs: {overlay}: overlay is a child of {a}, not of {b}\n"
    assert overlay.exists()  # it existed before: never removed


def test_failed_overlay_mount_removes_the_new_overlay(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), SIZE)
    overlay = tmp_path / "new.vhd"
    result = _vhdfs("-o", f"overlay={overlay}", image, tmp_path / "no-such-dir")
    assert result.returncode == 5
    assert not overlay.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_out_dirty_data_and_keeps_a_busy_mount(
    sig: signal.Signals, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image, model = _image(tmp_path, "dynamic")
    notify = NotifySocket(tmp_path / "notify")
    m = mount([image], options=["writeback=3600"], env={"NOTIFY_SOCKET": notify.path})
    fd = os.open(m.raw(image.stem + ".raw"), os.O_WRONLY)
    data = pattern(11, 3 * MiB)
    os.pwrite(fd, data, 2 * MiB + 512)  # held in memory: no fsync, no close
    model[2 * MiB + 512 : 5 * MiB + 512] = data
    assert m.pid is not None
    os.kill(m.pid, sig)
    notify.wait_for("STATUS", "in use, unmounting once the holders let go*")
    # Written out (qemu-img reads it from the image), and the open file still works.
    assert _read_image(image) == bytes(model)
    more = pattern(12, 8192)
    os.pwrite(fd, more, 0)
    model[:8192] = more
    os.close(fd)
    # The holder let go: the one signal ends the mount by itself.
    assert m.wait_exited() == 0
    notify.close()
    again = mount([image], options=["ro"])
    assert Path(again.raw(image.stem + ".raw")).read_bytes() == bytes(model)
    assert again.stop() == 0


def _read_image(image: Path) -> bytes:
    """The disk as qemu-img reads the image file, sharing it with the mount (-U)."""
    target = image.with_suffix(".qemu.raw")
    run(["qemu-img", "convert", "-U", "-f", "vpc", "-O", "raw", image, target])
    try:
        return target.read_bytes()
    finally:
        target.unlink()
