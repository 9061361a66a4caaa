"""QEMU boots a guest on the raw file: the guest writes patterns and file systems, powers off,
and the host reads the same bytes through vhdfs and through an independent reader of the VHD.

The guest is Debian's kernel with a busybox initramfs (scripts/build-guest.sh), under TCG: the
disk is a virtio disk ``format=raw``, with ``cache=none`` (O_DIRECT) and ``cache=writeback``,
on a plain image and on an overlay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.files import tree_hashes
from tests.support.guest import boot
from tests.support.images import run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command
from vhdfs.image.create import create_dynamic

pytestmark = pytest.mark.fuse

MiB = 1 << 20
DISK = 64 * MiB
PATTERN_AT = MiB

#: busybox fdisk: a new MBR, p1 ext2 at 4 MiB (24 MiB), p2 FAT32 on the rest (36 MiB: enough
#: clusters for a FAT32 that mtools and fsck.vfat accept).
FDISK = "o\\nn\\np\\n1\\n8192\\n+24M\\nn\\np\\n2\\n57344\\n\\nt\\n2\\nc\\nw\\n"
GUEST_SCRIPT = f"""
dd if=/pattern.bin of=/dev/vda bs=4096 seek={PATTERN_AT // 4096} conv=fsync 2>/dev/null
printf '{FDISK}' | fdisk /dev/vda >/dev/null
i=0; while [ ! -b /dev/vda2 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
mke2fs -q /dev/vda1
mount -t ext4 /dev/vda1 /mnt
echo "written by the guest on ext2" > /mnt/hello.txt
umount /mnt
mkdosfs /dev/vda2 >/dev/null
mount -t vfat /dev/vda2 /mnt
echo "written by the guest on vfat" > /mnt/HELLO.TXT
umount /mnt
sync
"""


def _check_guest_work(m: Mount, raw: str, pattern: bytes, tmp_path: Path) -> None:
    with open(raw, "rb") as f:
        f.seek(PATTERN_AT)
        assert f.read(len(pattern)) == pattern
    # (busybox's mkdosfs leaves a label fsck.vfat frowns on; mtools reads the FAT strictly)
    vfat = m.raw(Path(raw).stem + ".p2")
    assert run(["mtype", "-i", vfat, "::HELLO.TXT"]) == "written by the guest on vfat\n"
    run(["e2fsck", "-fn", m.raw(Path(raw).stem + ".p1")])
    listing = run(["debugfs", "-R", "cat /hello.txt", m.raw(Path(raw).stem + ".p1")])
    assert listing == "written by the guest on ext2\n"


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_guest_writes_land_in_the_image(
    cache: str, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "guest.vhd"
    create_dynamic(str(image), DISK)
    pattern = random.Random(cache).randbytes(MiB)
    m = mount([image], options=["partitions"])
    raw = m.raw("guest.raw")
    boot(raw, GUEST_SCRIPT, tmp_path, cache=cache, files={"pattern.bin": pattern})
    _check_guest_work(m, raw, pattern, tmp_path)
    with open(raw, "rb") as f:
        ours = f.read()
    assert m.stop() == 0
    qemu = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, qemu])
    assert qemu.read_bytes() == ours
    run([*vhd_command(), "check", image])


def test_guest_on_an_overlay(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    base = tmp_path / "base" / "golden.vhd"
    base.parent.mkdir()
    create_dynamic(str(base), DISK)
    golden = tree_hashes(base.parent)
    overlay = tmp_path / "try.vhd"
    pattern = random.Random(7).randbytes(MiB)
    m = mount([base], options=["partitions", f"overlay={overlay}"])
    raw = m.raw("golden.raw")
    boot(raw, GUEST_SCRIPT, tmp_path, cache="none", files={"pattern.bin": pattern})
    _check_guest_work(m, raw, pattern, tmp_path)
    with open(raw, "rb") as f:
        ours = f.read()
    assert m.stop() == 0
    assert tree_hashes(base.parent) == golden
    # vhdimount finds a parent by its name beside the child: give it one.
    (tmp_path / "golden.vhd").symlink_to(base)
    (tmp_path / "vhdi").mkdir()
    assert read_with_vhdimount(str(overlay), str(tmp_path / "vhdi")) == ours
    run([*vhd_command(), "check", overlay])
