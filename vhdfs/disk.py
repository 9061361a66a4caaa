"""VirtualDisk: the raw disk of one chain, as async read (and later write) calls.

A read has three steps. Planning is synchronous: the chain maps the range to extents, pulling
any metadata it lacks through the block cache, with no checkpoint in between, so the plan
describes one consistent state. Zeros and cached data are answered at once. What remains is one
host read per contiguous allocated run, done through HostIO, and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhdfs.cache.block_cache import BlockCache
from vhdfs.cache.lru import CacheStatistics
from vhdfs.errors import HostIOError
from vhdfs.hostio import HostIO
from vhdfs.image.chain import ZEROS, Chain

_ZERO_BLOCK = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZERO_BLOCK)


@dataclass(frozen=True, slots=True)
class DiskStatistics:
    """Counters of one disk, for SIGUSR1 and the benchmark scripts."""

    reads: int
    bytes_read: int
    host_reads: int
    cache: CacheStatistics


class VirtualDisk:
    """The guest-visible disk of ``chain``.

    Args:
        chain: The opened images.
        cache: Cache over the chain's layers.
        hostio: Where host reads run.
    """

    def __init__(self, chain: Chain, cache: BlockCache, hostio: HostIO) -> None:
        self.chain = chain
        self.cache = cache
        self.hostio = hostio
        self.size = chain.virtual_size
        self.read_only = not chain.leaf.file.writable
        self._reads = 0
        self._bytes_read = 0
        self._host_reads = 0

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Up to ``length`` bytes at ``offset``; shorter only at the end of the disk."""
        plan = self.chain.plan_read(offset, length, self.cache)
        self._reads += 1
        parts: list[bytes | bytearray | memoryview] = []
        for _start, count, layer, host in plan:
            if layer == ZEROS:
                parts.append(_ZERO_VIEW[:count] if count <= len(_ZERO_BLOCK) else bytes(count))
            else:
                parts.append(await self._read_layer(layer, host, count))
        self._bytes_read += sum(len(p) for p in parts)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def _read_layer(
        self, layer: int, offset: int, length: int
    ) -> bytes | bytearray | memoryview:
        data = self.cache.cached_data(layer, offset, length)
        if data is not None:
            return data
        start, stop, cacheable = self.cache.chunk_span(layer, offset, length)
        file = self.chain.layers[layer].file
        raw = await self.hostio.read(file, start, stop - start)
        self._host_reads += 1
        skip = offset - start
        if len(raw) < skip + length:
            raise HostIOError(
                file.path,
                f"file ended early: read at {offset} returned {len(raw) - skip} of {length} bytes",
            )
        if cacheable:
            self.cache.store_data(layer, start, raw)
        if skip == 0 and len(raw) == length:
            return raw
        return memoryview(raw)[skip : skip + length]

    def statistics(self) -> DiskStatistics:
        """Current counters."""
        return DiskStatistics(
            reads=self._reads,
            bytes_read=self._bytes_read,
            host_reads=self._host_reads,
            cache=self.cache.statistics(),
        )

    async def aclose(self) -> None:
        """Stop the I/O threads and release the images."""
        self.hostio.close()
        self.chain.close()
