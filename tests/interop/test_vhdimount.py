"""Images and chains made by ``vhd create`` read identically in vhdimount and in vhdfs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain, run
from tests.support.mounting import Mount, read_with_vhdimount

pytestmark = pytest.mark.fuse

MiB = 1 << 20

# libvhdi treats every sector after the first set bit of a bitmap byte as present, so these
# layers change whole bitmap bytes: runs of 8 sectors, 8-aligned.
CASES = {
    "fixed": [Layer(kind="fixed", writes=[(0, 8), (2048, 64), (20472, 8)])],
    "dynamic": [Layer(writes=[(8, 16), (4088, 16), (20472, 8)])],
    "dynamic-512k": [Layer(block_size=512 << 10, writes=[(1016, 16), (9000 // 8 * 8, 80)])],
    "chain-2": [
        Layer(writes=[(0, 4096)]),
        Layer(block_size=512 << 10, writes=[(8, 8), (1024, 1032), (20000, 8)]),
    ],
    "chain-4": [
        Layer(kind="fixed", writes=[(0, 20480)]),
        Layer(writes=[(64, 64), (4096, 8)]),
        Layer(block_size=64 << 10, writes=[(72, 8), (4104, 16), (10000, 8)]),
        Layer(block_size=4096, writes=[(80, 8), (4096, 8), (20472, 8)]),
    ],
}


@pytest.mark.parametrize("name", CASES)
def test_vhdimount_and_vhdfs_agree(name: str, tmp_path: Path, mount: Callable[..., Mount]) -> None:
    built = build_chain(tmp_path / "images", 10 * MiB, CASES[name])
    info = run(["vhdiinfo", built.leaf])
    assert "Media size\t\t: 10 MiB (10485760 bytes)" in info
    vhdimount_point = tmp_path / "vhdi"
    vhdimount_point.mkdir()
    theirs = read_with_vhdimount(str(built.leaf), str(vhdimount_point))
    m = mount([built.leaf])
    ours = Path(m.raw(built.leaf.stem + ".raw")).read_bytes()
    assert ours == bytes(built.expected)
    assert theirs == bytes(built.expected)
    assert m.stop() == 0
