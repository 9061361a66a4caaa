"""The block cache's direct map: one lookup per read, and never stale after a write."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.support.images import SECTOR, Layer, build_chain, pattern
from vhdfs.cache import block_cache
from vhdfs.disk.virtual import DiskOptions, open_disk
from vhdfs.image.chain import Chain
from vhdfs.image.extents import Extent

BLOCK = 64 << 10


def test_maps_each_block_to_the_layer_that_answers_it(tmp_path: Path) -> None:
    # Block 0: whole in the base. Block 1: whole in the leaf. Block 2: nowhere (zeros).
    # Block 3: half leaf, half base (mixed: each read asks the chain).
    per_block = BLOCK // SECTOR
    built = build_chain(
        tmp_path,
        4 * BLOCK,
        [
            Layer(block_size=BLOCK, writes=[(0, per_block), (3 * per_block, per_block)]),
            Layer(block_size=BLOCK, writes=[(per_block, per_block), (3 * per_block, 8)]),
        ],
    )
    disk = open_disk(str(built.leaf), DiskOptions(read_only=True))
    try:
        cache = disk.cache
        base = cache.direct(4096, 512)
        leaf = cache.direct(BLOCK + 4096, 512)
        assert (base.layer, leaf.layer) == (1, 0)  # type: ignore[union-attr]
        assert cache.direct(2 * BLOCK + 100, 50) == Extent(2 * BLOCK + 100, 50, None, 0)
        assert cache.direct(3 * BLOCK, 8 * SECTOR).layer == 0  # type: ignore[union-attr]
        assert cache.direct(3 * BLOCK + 4096, 512).layer == 1  # type: ignore[union-attr]
        assert cache.direct(3 * BLOCK + 3072, 2048) is None  # leaf and base: not one extent
        pieces = cache.map_read(3 * BLOCK + 3072, 2048)
        assert pieces is not None
        assert [(e.offset, e.length, e.layer) for e in pieces] == [
            (3 * BLOCK + 3072, 1024, 0),
            (3 * BLOCK + 4096, 1024, 1),
        ]
        assert cache.direct(BLOCK - 512, 1024) is None  # crosses a block boundary
        for offset in (0, 4096, BLOCK + 512, 2 * BLOCK, 3 * BLOCK + 2048, 3 * BLOCK + 8192):
            data = trio.run(disk.read, offset, 4096)
            assert bytes(data) == bytes(built.expected[offset : offset + 4096])
    finally:
        trio.run(disk.aclose)


def test_a_write_moves_a_block_from_parent_to_leaf(tmp_path: Path) -> None:
    built = build_chain(
        tmp_path,
        2 * BLOCK,
        [Layer(block_size=BLOCK, writes=[(0, 2 * BLOCK // SECTOR)]), Layer(block_size=BLOCK)],
    )
    new = pattern(99, 4096)

    async def scenario() -> None:
        disk = open_disk(str(built.leaf), DiskOptions())
        try:
            assert bytes(await disk.read(8192, 4096)) == built.expected[8192:12288]
            assert disk.cache.direct(8192, 4096).layer == 1  # type: ignore[union-attr]
            await disk.write(8192, new)
            await disk.flush(durable=False)
            # The leaf's block is now allocated with a partial bitmap: no single layer answers
            # the whole block, and a read of what was written comes from the leaf.
            assert disk.cache.direct(8192, 4096).layer == 0  # type: ignore[union-attr]
            assert bytes(await disk.read(8192, 4096)) == new
            assert bytes(await disk.read(0, 4096)) == built.expected[:4096]
        finally:
            await disk.aclose()

    trio.run(scenario)


def test_the_map_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = build_chain(tmp_path, 64 * BLOCK, [Layer(block_size=BLOCK)])
    monkeypatch.setattr(block_cache, "BLOCK_EXTENTS_LIMIT", 4)
    # The limit follows the budget: 16 KiB of cache_size is room for 8 extents.
    disk = open_disk(str(built.leaf), DiskOptions(read_only=True, cache_size=16 << 10))
    try:
        for block in range(64):
            assert disk.cache.direct(block * BLOCK, 512) == Extent(block * BLOCK, 512, None, 0)
            assert len(disk.cache._direct) <= 8
        assert len(disk.cache._direct) > 4
    finally:
        trio.run(disk.aclose)


def test_the_limit_follows_the_budget(tmp_path: Path) -> None:
    built = build_chain(tmp_path, 64 * BLOCK, [Layer(block_size=BLOCK)])
    chain = Chain.open(str(built.leaf), lock=False)
    try:
        assert block_cache.BlockCache(chain, 64 << 20)._direct_limit == 32768
        # Never below one fragmented block's worth.
        assert block_cache.BlockCache(chain, 1 << 20)._direct_limit == 1024
    finally:
        chain.close()
