"""vhd commit and vhd convert with block sizes from 512 bytes to 256 MiB.

A tool runs no flusher task: its disks write out as they go (``DiskOptions.offline``), so a
run of data larger than the dirty limit, copied into a block larger than the dirty limit and
the cache, finishes with bounded memory. Every result is compared with qemu-img's reading of
it, and checked clean.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.images import SECTOR, BuiltChain, Layer, build_chain, pattern, run
from tests.support.mounting import vhd_command
from vhdfs.disk.virtual import DEFAULT_DIRTY_LIMIT, DiskOptions, open_disk
from vhdfs.image.create import create_dynamic

MiB = 1 << 20
#: A tool that waits for a flusher hangs: well under pytest-timeout, so the test says which.
HANG_GUARD = 60
#: Longer than the dirty limit: copied as one run, it cannot wait in memory whole.
LONG_RUN = DEFAULT_DIRTY_LIMIT + 16 * MiB


def _vhd(*args: str | Path) -> dict[str, Any]:
    result = subprocess.run(
        [*vhd_command(), *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _assert_reads_as(
    image: Path, expected: bytes | bytearray, tmp_path: Path, block: int = 2 * MiB
) -> None:
    """``image`` (fixed or dynamic) reads as ``expected``, compared piecewise.

    Read by qemu-img; blocks below 4 KiB by vhd convert instead: qemu-img takes their
    bitmap for 0 sectors long and reads it as data, and vhdimount fails on them with EIO.
    """
    raw = tmp_path / f"{image.name}.raw"
    if block < 4096:
        _vhd("convert", "-O", "raw", image, raw)
    else:
        run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, raw])
    _assert_file_is(raw, expected)
    raw.unlink()


def _assert_file_is(path: Path, expected: bytes | bytearray) -> None:
    view = memoryview(expected)
    step = 16 * MiB
    with open(path, "rb") as file:
        for offset in range(0, len(view), step):
            assert file.read(step) == view[offset : offset + step], f"differs in [{offset}, +16M)"
        assert file.read(1) == b""


def _assert_clean(*images: Path) -> None:
    for image in images:
        result = subprocess.run(
            [*vhd_command(), "check", str(image)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout


# (block size, disk size, sector runs of the parent, sector runs of the child)
CASES = {
    # Thousands of blocks: one run of the child spans 2048 of them.
    "512B": (SECTOR, 4 * MiB, [(0, 16), (3000, 100)], [(8, 2048), (3050, 7)]),
    # One run longer than the dirty limit inside one block, another in the last block.
    "128MiB": (
        128 * MiB,
        129 * MiB,
        [(0, 16), (2000, 4096)],
        [(2051, LONG_RUN // SECTOR), (128 * MiB // SECTOR + 7, 9)],
    ),
    "256MiB": (
        256 * MiB,
        257 * MiB,
        [(0, 16), (2000, 4096)],
        [(2051, LONG_RUN // SECTOR), (256 * MiB // SECTOR + 7, 9)],
    ),
}


def _build(case: str, tmp_path: Path) -> tuple[BuiltChain, int]:
    """The chain of ``case`` (child, parent) and the bytes its child holds."""
    block, size, parent_runs, child_runs = CASES[case]
    layers = [
        Layer(block_size=block, writes=parent_runs),
        Layer(block_size=block, writes=child_runs),
    ]
    built = build_chain(tmp_path / "chain", size, layers)
    return built, sum(count for _, count in child_runs) * SECTOR


@pytest.mark.parametrize("case", list(CASES))
def test_commit_finishes_for_every_block_size(case: str, tmp_path: Path) -> None:
    built, held = _build(case, tmp_path)
    child, parent = built.paths
    report = _vhd("commit", child)
    assert report["bytes_committed"] == held
    _assert_reads_as(parent, built.expected, tmp_path, CASES[case][0])
    assert _vhd("info", child)["layers"][0]["allocated_blocks"] == 0
    _assert_clean(child, parent)


@pytest.mark.parametrize("case", list(CASES))
def test_convert_finishes_for_every_block_size(case: str, tmp_path: Path) -> None:
    built, _ = _build(case, tmp_path)
    block = CASES[case][0]
    out = tmp_path / "flat.vhd"
    report = _vhd("convert", "--block-size", str(block), built.leaf, out)
    assert report["virtual_size"] == len(built.expected)
    _assert_reads_as(out, built.expected, tmp_path, block)
    _assert_clean(out)
    raw = tmp_path / "flat.img"
    _vhd("convert", "-O", "raw", built.leaf, raw)
    _assert_file_is(raw, built.expected)


async def test_an_offline_disk_writes_out_as_it_goes(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 16 * MiB)
    limit = MiB
    expected = bytearray(16 * MiB)
    # One write four times the limit (not sector-aligned), then many small ones.
    small = [(6 * MiB + n * 300 * 1024, 256 << 10) for n in range(20)]
    writes = [(3 * SECTOR + 5, 4 * MiB), *small]
    with trio.fail_after(HANG_GUARD):
        options = DiskOptions(explicit_rw=True, offline=True, dirty_limit=limit)
        disk = open_disk(str(image), options)
        assert disk.writeback is not None
        try:
            for number, (offset, length) in enumerate(writes):
                data = pattern(number + 1, length)
                assert await disk.write(offset, data) == length
                expected[offset : offset + length] = data
                # Written out before the write returned, whenever it passed the limit.
                assert disk.writeback.statistics().dirty_bytes <= limit
        finally:
            await disk.aclose()
    _assert_reads_as(image, expected, tmp_path)
    _assert_clean(image)
