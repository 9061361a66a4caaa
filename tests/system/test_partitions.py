"""-o partitions: a file per MBR (primary and logical) and GPT partition, numbered as Linux
numbers them, following the table as it is rewritten through the mount, loop-mountable."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import run
from tests.support.mounting import Mount
from vhdfs.image.create import create_dynamic

pytestmark = pytest.mark.fuse

MiB = 1 << 20
DISK = 64 * MiB

MBR = """label: dos
start=2048, size=20480, type=83
start=22528, size=90112, type=5
start=24576, size=16384, type=83
start=43008, size=20480, type=c
"""
GPT = """label: gpt
first-lba: 2048
1 : start=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
3 : start=40960, size=40960, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
"""


def _sfdisk(target: str, script: str) -> None:
    # A raw file, not a block device: sfdisk's request to re-read the table fails harmlessly.
    subprocess.run(["sfdisk", "--no-reread", "-q", target], input=script, text=True, check=True,
                   capture_output=True)  # fmt: skip


def _listing(mountpoint: str) -> dict[str, int]:
    return {
        name: os.path.getsize(os.path.join(mountpoint, name)) for name in os.listdir(mountpoint)
    }


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), DISK)
    return image


def test_mbr_primaries_and_logicals(disk: Path, mount: Callable[..., Mount]) -> None:
    m = mount([disk], options=["partitions"])
    assert _listing(m.mountpoint) == {"disk.raw": DISK}
    _sfdisk(m.raw("disk.raw"), MBR)
    # The extended container (slot 2) is no partition file; its logicals are 5 and 6.
    assert _listing(m.mountpoint) == {
        "disk.raw": DISK,
        "disk.p1": 20480 * 512,
        "disk.p5": 16384 * 512,
        "disk.p6": 20480 * 512,
    }
    raw = Path(m.raw("disk.raw"))
    with open(raw, "r+b") as f:
        f.seek(24576 * 512 + 1000)
        f.write(b"logical five")
    assert Path(m.raw("disk.p5")).read_bytes()[1000:1012] == b"logical five"
    fd = os.open(m.raw("disk.p6"), os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"end!+", 20480 * 512 - 4) == 4  # cut at the partition's end
        with pytest.raises(OSError, match="No space left"):
            os.pwrite(fd, b"x", 20480 * 512)
    finally:
        os.close(fd)
    with open(raw, "rb") as f:
        f.seek(43008 * 512 + 20480 * 512 - 4)
        assert f.read(4) == b"end!"
    assert m.stop() == 0


def test_gpt_numbering_and_a_rewritten_table(disk: Path, mount: Callable[..., Mount]) -> None:
    m = mount([disk], options=["partitions"])
    _sfdisk(m.raw("disk.raw"), GPT)
    assert _listing(m.mountpoint) == {
        "disk.raw": DISK,
        "disk.p1": 20480 * 512,
        "disk.p3": 40960 * 512,
    }
    # Rewritten through the mount, without a remount: the files follow.
    _sfdisk(m.raw("disk.raw"), "label: gpt\nstart=4096, size=8192\n")
    assert _listing(m.mountpoint) == {"disk.raw": DISK, "disk.p1": 8192 * 512}
    assert not os.path.exists(m.raw("disk.p3"))
    assert m.stop() == 0


def test_partitions_past_the_end_and_damaged_tables(
    disk: Path, mount: Callable[..., Mount]
) -> None:
    sectors = DISK // 512
    mbr = bytearray(512)
    for slot, (kind, first, count) in enumerate(
        [(0x83, sectors + 10, 100), (0x83, sectors - 100, 1000), (0, 0, 0), (0x83, 2048, 0)]
    ):
        struct.pack_into("<B3xB3xII", mbr, 446 + 16 * slot, 0, kind, first, count)
    mbr[510:512] = b"\x55\xaa"
    m = mount([disk], options=["partitions"])
    raw = Path(m.raw("disk.raw"))
    with open(raw, "r+b") as f:
        f.write(mbr)
    # Linux drops p1 (it starts past the end) and cuts p2 at the end; p4 is empty.
    assert _listing(m.mountpoint) == {"disk.raw": DISK, "disk.p2": 100 * 512}
    _sfdisk(str(raw), GPT)
    with open(raw, "r+b") as f:  # break both GPT headers' CRCs
        for lba in (1, sectors - 1):
            f.seek(lba * 512 + 16)
            f.write(b"\xff\xff\xff\xff")
    assert _listing(m.mountpoint) == {"disk.raw": DISK}
    assert m.stop() == 0


@pytest.mark.root
def test_partition_files_hold_ext4_and_vfat(
    disk: Path, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    m = mount([disk], options=["partitions"])
    _sfdisk(m.raw("disk.raw"), MBR)
    ext4_text, vfat_text = b"ext4 on the first primary\n", b"vfat on the first logical\n"
    run(["mkfs.ext4", "-q", m.raw("disk.p1")])
    run(["mkfs.vfat", m.raw("disk.p5")])
    guest = tmp_path / "guest"
    guest.mkdir()
    # ext4 through a loop device on the partition file, as on a kernel that parses no tables;
    # vfat with mtools (this kernel has no vfat driver; the QEMU guest test mounts one).
    run(["mount", "-o", "loop", m.raw("disk.p1"), guest])
    try:
        (guest / "hello.txt").write_bytes(ext4_text)
    finally:
        run(["umount", guest])
    source = tmp_path / "hello.txt"
    source.write_bytes(vfat_text)
    run(["mcopy", "-i", m.raw("disk.p5"), source, "::HELLO.TXT"])
    assert m.stop() == 0

    again = mount([disk], options=["ro,partitions"])
    run(["fsck.ext4", "-fn", again.raw("disk.p1")])
    run(["fsck.vfat", "-n", again.raw("disk.p5")])
    run(["mount", "-o", "loop,ro", again.raw("disk.p1"), guest])
    try:
        assert (guest / "hello.txt").read_bytes() == ext4_text
    finally:
        run(["umount", guest])
    assert run(["mtype", "-i", again.raw("disk.p5"), "::HELLO.TXT"]).encode() == vfat_text
    assert again.stop() == 0
