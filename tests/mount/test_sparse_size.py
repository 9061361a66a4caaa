"""``du`` of a raw file shows what the image holds, not the size of the disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.mounting import Mount
from vhdfs.image.create import create_differencing, create_dynamic, create_fixed

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def test_st_blocks_follows_the_allocation(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    empty = tmp_path / "empty.vhd"
    create_dynamic(str(empty), 64 * MiB, 2 * MiB)
    fixed = tmp_path / "fixed.vhd"
    create_fixed(str(fixed), 8 * MiB)
    m = mount([empty, fixed])
    raw = m.raw("empty.raw")
    assert (os.stat(raw).st_size, os.stat(raw).st_blocks) == (64 * MiB, 0)
    assert os.stat(m.raw("fixed.raw")).st_blocks == 8 * MiB // 512
    with open(raw, "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"x" * 4096)  # one 2 MiB block
    assert m.stop() == 0
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(empty))
    again = mount([child], options=["ro"])
    assert os.stat(again.raw("child.raw")).st_blocks == 2 * MiB // 512
    assert again.stop() == 0


def test_data_still_in_memory_counts(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    # An archiver that sees 0 blocks takes the file for one big hole (GNU tar --sparse): data
    # written but not yet in the image must count, and the count must follow each write.
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 64 * MiB, 2 * MiB)
    m = mount([image], options=["writeback=3600"])
    raw = m.raw("d.raw")
    assert os.stat(raw).st_blocks == 0
    with open(raw, "r+b") as f:
        f.write(b"y" * 8192)  # held in memory: nothing allocated in the image yet
        assert os.stat(raw).st_blocks == 8192 // 512
    assert m.stop() == 0
