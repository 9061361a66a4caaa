"""A guest disk inside a VHD: partition table + ext4, loop device with partitions, mount, read."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.images import run
from tests.support.mounting import Mount
from tests.support.vhdwrite import write_sectors
from vhdfs.image.create import create_dynamic

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
DISK = 48 * MiB


def _guest_raw(tmp_path: Path) -> tuple[Path, bytes]:
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    text = b"guest file system inside a VHD\n" * 100
    (content / "etc" / "motd").write_bytes(text)
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK)
    run(["sfdisk", "-q", raw], input="label: dos\nstart=2048, type=83\n")
    run(["mkfs.ext4", "-q", "-E", "offset=1048576", "-d", content, raw, "47M"])
    return raw, text


@contextlib.contextmanager
def _loop_partition(raw_disk: str) -> Iterator[str]:
    loop = run(["losetup", "-r", "-P", "--show", "-f", raw_disk]).strip()
    try:
        # Kernels without MBR parsing (this CI's VM) find no partitions; partx adds them.
        subprocess.run(["partx", "-a", loop], capture_output=True)
        yield f"{loop}p1"
    finally:
        run(["losetup", "-d", loop])


def _read_guest_file(raw_disk: str, mountpoint: Path) -> bytes:
    mountpoint.mkdir()
    with _loop_partition(raw_disk) as partition:
        run(["mount", "-o", "ro", partition, mountpoint])
        try:
            return (mountpoint / "etc" / "motd").read_bytes()
        finally:
            run(["umount", mountpoint])


def test_qemu_converted_guest_disk(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    raw, text = _guest_raw(tmp_path)
    image = tmp_path / "guest.vhd"
    run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, image])
    m = mount([image])
    assert _read_guest_file(m.raw("guest.raw"), tmp_path / "guest") == text
    assert m.stop() == 0


def test_guest_disk_in_created_image(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    raw, text = _guest_raw(tmp_path)
    image = tmp_path / "made.vhd"
    create_dynamic(str(image), DISK, 512 << 10)
    data = raw.read_bytes()
    for offset in range(0, DISK, MiB):
        chunk = data[offset : offset + MiB]
        if chunk.count(0) != len(chunk):
            write_sectors(str(image), offset, chunk)
    target = tmp_path / "disk.img"
    target.touch()
    m = mount([image], target)  # single-file mountpoint: the loop device sits on it directly
    assert _read_guest_file(str(target), tmp_path / "guest") == text
    assert m.stop() == 0
