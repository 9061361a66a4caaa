"""A real file system on a vhdfs disk: partition, mkfs, copy a tree in, remount, fsck."""

from __future__ import annotations

import contextlib
import filecmp
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.images import run
from tests.support.mounting import Mount
from vhdfs.image.create import create_dynamic

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def _make_tree(root: Path) -> None:
    rng = random.Random(42)
    for d in range(12):
        folder = root / f"dir{d}" / f"sub{d % 3}"
        folder.mkdir(parents=True)
        for f in range(15):
            size = rng.choice([0, 1, 511, 4096, 70_000, 1 << 20, 3 * (1 << 20) + 17])
            (folder / f"file{f}.bin").write_bytes(rng.randbytes(size))
    (root / "empty").mkdir()


@contextlib.contextmanager
def _partition(raw: str, *, read_only: bool) -> Iterator[str]:
    loop = run(["losetup", *(["-r"] if read_only else []), "-P", "--show", "-f", raw]).strip()
    try:
        subprocess.run(["partx", "-a", loop], capture_output=True)
        yield f"{loop}p1"
    finally:
        run(["losetup", "-d", loop])


def test_ext4_on_a_dynamic_disk_survives_remount_and_fsck(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    tree = tmp_path / "tree"
    _make_tree(tree)
    image = tmp_path / "fs.vhd"
    create_dynamic(str(image), 256 << 20)
    guest = tmp_path / "guest"
    guest.mkdir()
    m = mount([image])
    raw = m.raw("fs.raw")
    run(["sfdisk", "-q", raw], input="label: gpt\nstart=2048, type=linux\n")
    with _partition(raw, read_only=False) as part:
        run(["mkfs.ext4", "-q", "-L", "vhdfs", part])
        run(["mount", part, guest])
        try:
            run(["cp", "-a", f"{tree}/.", str(guest)])
        finally:
            run(["umount", guest])
    assert m.stop() == 0
    check = mount([image], options=["ro"])
    with _partition(check.raw("fs.raw"), read_only=True) as part:
        run(["fsck.ext4", "-fn", part])
        run(["mount", "-o", "ro", part, guest])
        try:
            comparison = filecmp.dircmp(tree, guest, ignore=["lost+found"])
            assert _identical(comparison)
        finally:
            run(["umount", guest])
    assert check.stop() == 0


def _identical(comparison: filecmp.dircmp[str]) -> bool:
    if comparison.left_only or comparison.right_only or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(
        comparison.left, comparison.right, comparison.common_files, shallow=False
    )
    if mismatch or errors:
        return False
    return all(_identical(sub) for sub in comparison.subdirs.values())
