"""The byte-budgeted LRU and the block cache's use of it."""

from __future__ import annotations

from pathlib import Path

from tests.support.images import Layer, build_chain
from vhdfs.cache.block_cache import (
    CACHED_READ_LIMIT,
    DATA_CHUNK,
    MIN_CACHE_SIZE,
    BlockCache,
    DataRead,
)
from vhdfs.cache.lru import ENTRY_OVERHEAD, LruCache
from vhdfs.image.chain import Chain


def test_evicts_least_recently_used_by_bytes() -> None:
    cache: LruCache[str, bytes] = LruCache(3 * (100 + ENTRY_OVERHEAD))
    for key in "abc":
        cache.put(key, key.encode() * 100, 100)
    assert cache.get("a") == b"a" * 100  # a is now the most recent
    cache.put("d", b"d" * 100, 100)
    assert cache.get("b") is None
    assert [cache.get(k) is not None for k in "acd"] == [True, True, True]
    stats = cache.statistics()
    assert (stats.entries, stats.evictions, stats.bytes) == (3, 1, 3 * (100 + ENTRY_OVERHEAD))
    assert (stats.hits, stats.misses) == (4, 1)


def test_replacing_and_oversized_entries() -> None:
    cache: LruCache[str, str] = LruCache(1000)
    cache.put("a", "x", 500)
    cache.put("a", "y", 100)
    assert cache.get("a") == "y"
    assert cache.statistics().bytes == 100 + ENTRY_OVERHEAD
    cache.put("big", "z", 5000)  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("big") is None
    assert cache.get("a") == "y"
    cache.discard("a")
    assert len(cache) == 0
    assert cache.statistics().bytes == 0


def test_block_cache_stays_within_budget(tmp_path: Path) -> None:
    built = build_chain(tmp_path, 8 << 20, [Layer(writes=[(0, 16384)])])
    chain = Chain.open(str(built.leaf))
    try:
        cache = BlockCache(chain, MIN_CACHE_SIZE)
        entry = cache.bat_entry(0, 0)
        host = entry * 512 + 512
        for offset in range(0, 8 << 20, DATA_CHUNK):
            # The first read of a chunk is done exactly and not cached; the second one is.
            first = cache.lookup(0, host + offset, 4096)
            assert isinstance(first, DataRead)
            assert (first.start, first.stop, first.cacheable) == (
                host + offset,
                host + offset + 4096,
                False,
            )
            cache.fill(first, chain.leaf.file.pread(first.start, 4096))
            second = cache.lookup(0, host + offset, 4096)
            assert isinstance(second, DataRead)
            assert second.cacheable
            assert second.start <= host + offset < host + offset + 4096 <= second.stop
            data = chain.leaf.file.pread(second.start, second.stop - second.start)
            wanted = data[host + offset - second.start : host + offset - second.start + 4096]
            assert bytes(cache.fill(second, data)) == wanted
            assert cache.lookup(0, host + offset, 4096) == wanted
        stats = cache.statistics()
        assert stats.bytes <= MIN_CACHE_SIZE
        assert stats.evictions > 0
        # A large read is done exactly as asked and not cached at all.
        large = cache.lookup(0, host + 1, CACHED_READ_LIMIT + 1)
        assert isinstance(large, DataRead)
        assert (large.start, large.stop, large.cacheable) == (
            host + 1,
            host + 2 + CACHED_READ_LIMIT,
            False,
        )
    finally:
        chain.close()
