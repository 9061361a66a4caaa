"""Images whose structures lie in unusual but legal places open, read and take writes.

The spec fixes no order of header, BAT, locator data and blocks. Each image here is crafted
byte by byte (``tests.support.craft``), read through a real mount, and compared with what it
was made to hold and with ``qemu-img convert`` (dynamic) or vhdimount (differencing). Then data
is written through the mount, into allocated and unallocated blocks, and the image is compared
again and must pass ``vhd check``.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.craft import Item, Parent, craft, unique_id_of
from tests.support.images import run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command
from vhdfs.image.create import create_dynamic

pytestmark = pytest.mark.fuse

BLOCK = 64 << 10
BLOCKS = 8
SIZE = BLOCK * BLOCKS

DYNAMIC_LAYOUTS: dict[str, list[Item]] = {
    "blocks-reversed": ["header", "bat", ("block", 6), ("block", 3), ("block", 1), ("block", 0)],
    "bat-last": ["header", ("block", 0), ("block", 5), ("block", 2), "bat"],
    "header-at-4096": [("gap", 3584), "header", "bat", ("block", 1), ("block", 7)],
    "bat-before-header": ["bat", "header", ("gap", 4096), ("block", 4)],
    "bat-between-blocks": ["header", ("block", 2), "bat", ("block", 0)],
}


def _blocks(layout: list[Item], seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {int(item[1]): rng.randbytes(BLOCK) for item in layout if item[0] == "block"}


def _expected(blocks: dict[int, bytes], below: bytes = bytes(SIZE)) -> bytearray:
    disk = bytearray(below)
    for block, data in blocks.items():
        disk[block * BLOCK : (block + 1) * BLOCK] = data
    return disk


def _qemu_raw(image: Path, target: Path) -> bytes:
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, target])
    return target.read_bytes()


def _write_through_mount(
    mount: Callable[..., Mount], image: Path, expected: bytearray, seed: int
) -> None:
    """Write into every block (allocated or not) at odd offsets; update ``expected``."""
    rng = random.Random(seed)
    m = mount([image])
    fd = os.open(m.raw(image.stem + ".raw"), os.O_WRONLY)
    try:
        for block in range(BLOCKS):
            offset = block * BLOCK + rng.randrange(0, BLOCK - 5000)
            data = rng.randbytes(rng.randrange(1, 5000))
            os.pwrite(fd, data, offset)
            expected[offset : offset + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    assert m.stop() == 0
    check = subprocess.run([*vhd_command(), "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("name", DYNAMIC_LAYOUTS)
def test_dynamic_layouts(name: str, tmp_path: Path, mount: Callable[..., Mount]) -> None:
    layout = DYNAMIC_LAYOUTS[name]
    image = tmp_path / "disk.vhd"
    blocks = _blocks(layout, seed=len(name))
    craft(image, size=SIZE, block_size=BLOCK, layout=layout, data=blocks)
    expected = _expected(blocks)
    assert _qemu_raw(image, tmp_path / "qemu.raw") == expected
    m = mount([image], options=["ro"])
    assert Path(m.raw("disk.raw")).read_bytes() == expected
    assert m.stop() == 0

    _write_through_mount(mount, image, expected, seed=7)
    assert _qemu_raw(image, tmp_path / "qemu-after.raw") == expected
    m = mount([image], options=["ro"])
    assert Path(m.raw("disk.raw")).read_bytes() == expected
    assert m.stop() == 0


def test_child_with_locators_between_blocks(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), SIZE, BLOCK)
    m = mount([base])
    base_data = random.Random(1).randbytes(SIZE)
    Path(m.raw("base.raw")).write_bytes(base_data)
    assert m.stop() == 0
    child = tmp_path / "child.vhd"
    relative = ".\\base.vhd".encode("utf-16-le")
    absolute = str(base).replace("/", "\\").encode("utf-16-le")
    parent = Parent(unique_id_of(base), "base.vhd", [(b"W2ku", absolute), (b"W2ru", relative)])
    layout: list[Item] = ["header", "bat", ("block", 5), "locators", ("block", 2)]
    blocks = _blocks(layout, seed=3)
    craft(child, size=SIZE, block_size=BLOCK, layout=layout, data=blocks, parent=parent)
    expected = _expected(blocks, base_data)

    m = mount([child], options=["ro"])
    assert Path(m.raw("child.raw")).read_bytes() == expected
    assert m.stop() == 0
    (tmp_path / "vhdi").mkdir()
    assert read_with_vhdimount(str(child), str(tmp_path / "vhdi")) == expected

    before = base.read_bytes()
    _write_through_mount(mount, child, expected, seed=9)
    assert base.read_bytes() == before
    m = mount([child], options=["ro"])
    assert Path(m.raw("child.raw")).read_bytes() == expected
    assert m.stop() == 0
