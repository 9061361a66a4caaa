"""Reads through VirtualDisk (chain planning, cache, host I/O) against the expected bytes.

No mount: these exercise the image and cache layers directly, with hypothesis choosing chain
shapes (depth 1 to 5, mixed block sizes, sector-granular overlapping writes) and reads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.images import SECTOR, Layer, build_chain
from vhdfs.cache.block_cache import MIN_CACHE_SIZE, BlockCache
from vhdfs.disk.hostio import IoMode
from vhdfs.disk.virtual import DiskOptions, open_disk
from vhdfs.image.chain import Chain
from vhdfs.image.extents import Extent

SIZE = 3 * 1024 * 1024 + 7 * SECTOR  # not a multiple of any block size
SECTORS = SIZE // SECTOR
BLOCK_SIZES = [4096, 64 << 10, 512 << 10, 2 << 20]


@st.composite
def layer_writes(draw: st.DrawFn) -> list[tuple[int, int]]:
    runs = []
    for _ in range(draw(st.integers(0, 6))):
        first = draw(st.integers(0, SECTORS - 1))
        count = draw(st.integers(1, min(300, SECTORS - first)))
        runs.append((first, count))
    return runs


@st.composite
def chains(draw: st.DrawFn) -> list[Layer]:
    depth = draw(st.integers(1, 5))
    layers = [
        Layer(
            kind=draw(st.sampled_from(["dynamic", "fixed"])) if i == 0 else "dynamic",
            block_size=draw(st.sampled_from(BLOCK_SIZES)),
            writes=draw(layer_writes()),
        )
        for i in range(depth)
    ]
    return layers


reads = st.lists(
    st.tuples(st.integers(0, SIZE + 4096), st.integers(0, 300_000)), min_size=1, max_size=12
)


def _read_all(leaf: Path, ranges: list[tuple[int, int]], mode: IoMode) -> list[bytes]:
    async def main() -> list[bytes]:
        options = DiskOptions(read_only=True, cache_size=MIN_CACHE_SIZE, io_mode=mode)
        disk = open_disk(str(leaf), options)
        try:
            return [bytes(await disk.read(offset, length)) for offset, length in ranges]
        finally:
            await disk.aclose()

    return trio.run(main)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=chains(), ranges=reads, mode=st.sampled_from(list(IoMode)))
def test_chain_reads_match_model(layers: list[Layer], ranges, mode: IoMode) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build_chain(Path(tmp), SIZE, layers)
        got = _read_all(built.leaf, ranges, mode)
        for (offset, length), data in zip(ranges, got, strict=True):
            assert data == bytes(built.expected[offset : offset + length])


def test_whole_disk_read_of_deep_chain(tmp_path: Path) -> None:
    # Every layer writes one sector in the same 4 KiB: the nearest layer must win per sector.
    layers = [Layer(writes=[(0, 8), (4000, 100)])] + [
        Layer(block_size=BLOCK_SIZES[i % 4], writes=[(i, 1), (4096 + i * 3, 2)])
        for i in range(1, 5)
    ]
    built = build_chain(tmp_path, SIZE, layers)
    (data,) = _read_all(built.leaf, [(0, SIZE)], IoMode.AUTO)
    assert data == bytes(built.expected)


def test_plan_merges_runs_and_skips_unallocated(tmp_path: Path) -> None:
    # Sectors 0-127 fill block 0; sectors 128-199 are written in two separate runs.
    layer = Layer(block_size=64 << 10, writes=[(0, 128), (128, 50), (178, 22)])
    built = build_chain(tmp_path, SIZE, [layer])
    chain = Chain.open(str(built.leaf))
    try:
        cache = BlockCache(chain)
        plan = chain.plan_read(0, 200 * SECTOR + 1000, cache)
        entry0, entry1 = cache.bat_entry(0, 0), cache.bat_entry(0, 1)
        # One host run per block however the sectors were written, then zeros.
        assert plan == [
            (0, 128 * SECTOR, 0, entry0 * SECTOR + SECTOR),
            (128 * SECTOR, 72 * SECTOR, 0, entry1 * SECTOR + SECTOR),
            Extent.zeros(200 * SECTOR, 1000),
        ]
        # A range with nothing allocated is one zero extent, answered without host I/O.
        assert chain.plan_read(SIZE - 8192, 100_000, cache) == [Extent.zeros(SIZE - 8192, 8192)]
    finally:
        chain.close()
