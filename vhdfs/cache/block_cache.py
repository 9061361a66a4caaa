"""BlockCache: one byte budget for BAT pages, sector bitmaps and data of every layer.

Keys name physical things of one host file, ``(layer, kind, index)``: BAT page *n*, the bitmap
of block *n*, or data chunk *n* (``DATA_CHUNK`` bytes of the file at ``n * DATA_CHUNK``). The
chain logic never sees the cache; it asks for metadata through the ``MetaSource`` methods, which
read missing entries from the image synchronously (metadata reads are small and, once a disk is
in use, almost always hits).

Data is cached as physical bytes, so a later write only has to drop the chunks it overlaps.
The cache owns its read-through: ``lookup`` answers from memory or says which host read to do
(``DataRead``), the caller does that read wherever its thread policy says, and ``fill`` takes
the bytes back, keeps what earns a place and returns what was asked. Which data earns a place
was decided by measurement (docs/performance.md): the host's page cache also holds the image
files, and a small read from it costs about as much as a hit here, while caching every miss
costs a copy. So:

* a host run longer than ``CACHED_READ_LIMIT`` is read exactly as asked and never cached:
  large reads are scans, which would evict everything else;
* a small read is cached only the second time its chunk is read (a bounded list of recently
  read chunk keys remembers the first time). Data read again is then served from memory,
  widened to whole chunks; one-off random reads cost no more than a plain host read;
* a read that was under way while the layer's file was written is not cached (the write
  epoch moved on): it may hold the old bytes.

Beside them sits the direct map: for each leaf block read recently, the extents it reads as
(``Chain.plan_read`` run once over the whole block: one extent for a block one layer holds
whole, several in a chain whose layers share it), so a read inside one block costs a dict
lookup and a bisect. Its size follows the budget (``DIRECT_MAP_BYTES_PER_EXTENT``) and it is
kept right by the
same calls that keep the metadata right (``set_bat_entry``, ``put_bitmap``,
``forget_metadata``).

Thread safety: used only from the trio thread, and no method awaits, so no lock is needed.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import OrderedDict
from typing import Any, NamedTuple

from vhdfs.cache.lru import CacheStatistics, LruCache
from vhdfs.errors import HostIOError
from vhdfs.format.bat import BAT_PAGE_ENTRIES
from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import UNALLOCATED, DiskType
from vhdfs.image.chain import Chain
from vhdfs.image.extents import Extent

#: Smallest budget accepted: enough for the metadata of any request. (A disk's budget, and its
#: default, come from ``vhdfs.disk.virtual.DiskOptions``.)
MIN_CACHE_SIZE = 1 << 20
#: Granularity of cached data, in bytes of the host file (chosen by measurement: larger chunks
#: cost more copying per small read).
DATA_CHUNK = 16 << 10
#: Host runs longer than this bypass the data cache.
CACHED_READ_LIMIT = 64 << 10

#: The direct map holds at most one extent (about 150 bytes) per this many bytes of the budget,
#: about 7% of ``cache_size`` (32768 extents for a 64 MiB budget), but never fewer than one
#: fragmented block's worth (about 15% of the 1 MiB minimum); when full it starts over. A block
#: it could not map counts as one extent.
DIRECT_MAP_BYTES_PER_EXTENT = 2048
#: A block with more extents than this is not mapped (each read of it is planned instead).
BLOCK_EXTENTS_LIMIT = 1024

_BAT = 0
_BITMAP = 1
_DATA = 2

CacheKey = tuple[int, int, int]


class _BlockMap(NamedTuple):
    """What one leaf block reads as: its extents in disk order, and where each starts."""

    starts: list[int]
    extents: list[Extent]


#: Direct-map value of a block too fragmented to map (see ``_map_block``).
_UNMAPPED = _BlockMap([], [])


class DataRead(NamedTuple):
    """A host read the cache needs done: bytes ``[start, stop)`` of the layer's file."""

    layer: int
    start: int
    stop: int
    #: What the caller asked for, inside ``[start, stop)``.
    offset: int
    length: int
    cacheable: bool
    #: The layer's write epoch when the read was planned.
    epoch: int


class BlockCache:
    """Bounded cache over the layers of ``chain``.

    Args:
        chain: The images whose metadata and data are cached.
        max_bytes: Budget for everything cached, at least ``MIN_CACHE_SIZE`` (the default).
    """

    def __init__(self, chain: Chain, max_bytes: int = MIN_CACHE_SIZE) -> None:
        self.chain = chain
        self.layers = chain.layers
        self._lru: LruCache[CacheKey, Any] = LruCache(max_bytes)
        self._bypass = min(CACHED_READ_LIMIT, max_bytes // 4)
        # Chunks read once recently but not cached (keys only): a chunk is cached when it is
        # read a second time, so one-off reads never pay for copying into the cache.
        self._seen: OrderedDict[CacheKey, None] = OrderedDict()
        self._seen_limit = max(1024, max_bytes // DATA_CHUNK)
        # Bumped whenever a layer's file is written: a read that was waiting on the disk
        # while a write went in must not cache what it read (it may be the old bytes).
        self._data_epoch = [0] * len(chain.layers)
        self._direct: dict[int, _BlockMap] = {}
        self._direct_extents = 0
        self._direct_limit = max(BLOCK_EXTENTS_LIMIT, max_bytes // DIRECT_MAP_BYTES_PER_EXTENT)
        leaf = chain.leaf
        self._unit = 0 if leaf.kind == DiskType.FIXED else leaf.block_size

    # -- the direct map ------------------------------------------------------------------

    def map_read(self, offset: int, length: int) -> list[Extent] | None:
        """The extents of a read inside one leaf block, from the direct map; else ``None``.

        ``None`` for a fixed leaf too, whose reads ``direct`` maps without a map.
        """
        unit = self._unit
        if not unit:
            return None
        index, within = divmod(offset, unit)
        if within + length > unit:
            return None
        found = self._direct.get(index)
        if found is None:
            found = self._map_block(index)
        if found is _UNMAPPED:
            return None
        end = offset + length
        extents = found.extents
        i = bisect_right(found.starts, offset) - 1
        first = extents[i]
        if end <= first.offset + first.length:  # the commonest case: one extent
            host = 0 if first.layer is None else first.host + offset - first.offset
            return [Extent(offset, length, first.layer, host)]
        out = []
        while offset < end:
            extent = extents[i]
            stop = min(end, extent.offset + extent.length)
            host = 0 if extent.layer is None else extent.host + offset - extent.offset
            out.append(Extent(offset, stop - offset, extent.layer, host))
            offset = stop
            i += 1
        return out

    def direct(self, offset: int, length: int) -> Extent | None:
        """The one extent of a read that one layer answers whole, or ``None``."""
        if not self._unit:
            return self.chain.direct(offset, offset + length, self)
        extents = self.map_read(offset, length)
        return extents[0] if extents is not None and len(extents) == 1 else None

    def _map_block(self, index: int) -> _BlockMap:
        start = index * self._unit
        end = min(start + self._unit, self.chain.virtual_size)
        extents = self.chain.plan_read(start, end - start, self)
        if not extents or len(extents) > BLOCK_EXTENTS_LIMIT:
            # A block fragmented this much (a huge block, sectors alternating between
            # layers) is planned per read instead; it holds one entry here.
            extents, found = [], _UNMAPPED
        cost = max(1, len(extents))
        if self._direct_extents + cost > self._direct_limit:
            self._direct.clear()
            self._direct_extents = 0
        if extents:
            found = _BlockMap([extent.offset for extent in extents], extents)
        self._direct[index] = found
        self._direct_extents += cost
        return found

    def _unmap(self, layer: int, block: int) -> None:
        """Forget what the direct map knows that metadata of ``layer``'s ``block`` decided."""
        if layer == 0:
            gone = self._direct.pop(block, None)
            if gone is not None:
                self._direct_extents -= max(1, len(gone.extents))
        else:  # a parent's block sizes need not match the leaf's
            self._direct.clear()
            self._direct_extents = 0

    # -- metadata (MetaSource) -----------------------------------------------------------

    def bat_entry(self, layer: int, block: int) -> int:
        """BAT entry of ``block`` in ``layer``; UNALLOCATED beyond the table."""
        image = self.layers[layer]
        if block >= image.bat_entries:
            return UNALLOCATED
        page_no, slot = divmod(block, BAT_PAGE_ENTRIES)
        key = (layer, _BAT, page_no)
        page: array[int] | None = self._lru.get(key)
        if page is None:
            page = image.read_bat_page(page_no)
            self._lru.put(key, page, len(page) * 4)
        return page[slot]

    def bitmap(self, layer: int, block: int, entry: int) -> SectorBitmap:
        """Sector bitmap of ``block`` in ``layer`` (whose BAT entry is ``entry``)."""
        key = (layer, _BITMAP, block)
        bitmap: SectorBitmap | None = self._lru.get(key)
        if bitmap is None:
            bitmap = self.layers[layer].read_bitmap(entry)
            self._lru.put(key, bitmap, bitmap.nbytes)
        return bitmap

    # -- data: the read-through -----------------------------------------------------------

    def lookup(self, layer: int, offset: int, length: int) -> bytes | bytearray | DataRead:
        """Bytes ``[offset, offset + length)`` of the layer's file, or the read to do first."""
        cached = self._cached(layer, offset, length)
        if cached is not None:
            return cached
        start, stop, cacheable = self._span(layer, offset, length)
        return DataRead(layer, start, stop, offset, length, cacheable, self._data_epoch[layer])

    def fill(self, read: DataRead, raw: bytes | bytearray) -> bytes | bytearray | memoryview:
        """Take the bytes of ``read`` from the host; return the part that was asked for.

        Raises:
            HostIOError: The file ended before the bytes asked for.
        """
        skip = read.offset - read.start
        if len(raw) < skip + read.length:
            raise HostIOError(
                self.layers[read.layer].path,
                f"file ended early: read at {read.offset} returned {len(raw) - skip} of "
                f"{read.length} bytes",
            )
        if read.cacheable and read.epoch == self._data_epoch[read.layer]:
            first = read.start // DATA_CHUNK
            for index, pos in enumerate(range(0, len(raw), DATA_CHUNK), first):
                chunk = raw[pos : pos + DATA_CHUNK]
                self._lru.put((read.layer, _DATA, index), chunk, len(chunk))
        if skip == 0 and len(raw) == read.length:
            return raw
        return memoryview(raw)[skip : skip + read.length]

    def _cached(self, layer: int, offset: int, length: int) -> bytes | bytearray | None:
        first, skip = divmod(offset, DATA_CHUNK)
        last = (offset + length - 1) // DATA_CHUNK
        if first == last:
            chunk: bytes | bytearray | None = self._lru.get((layer, _DATA, first))
            if chunk is None or len(chunk) < skip + length:
                return None
            return chunk[skip : skip + length]
        parts = []
        for index in range(first, last + 1):
            chunk = self._lru.get((layer, _DATA, index))
            if chunk is None:
                return None
            parts.append(chunk)
        joined = b"".join(parts)
        if len(joined) < skip + length:
            return None
        return joined[skip : skip + length]

    def _span(self, layer: int, offset: int, length: int) -> tuple[int, int, bool]:
        """The range of the layer's file to read for a request, and whether to cache it.

        A small read is widened to whole chunks (clipped to the file's size) when it is to be
        cached; otherwise exactly what was asked is read.
        """
        if length > self._bypass:
            return offset, offset + length, False
        first = (layer, _DATA, offset // DATA_CHUNK)
        if first not in self._seen:
            # First touch: read exactly what was asked, and remember that it was asked.
            self._seen[first] = None
            if len(self._seen) > self._seen_limit:
                self._seen.popitem(last=False)
            return offset, offset + length, False
        del self._seen[first]
        start = offset - offset % DATA_CHUNK
        stop = -(-(offset + length) // DATA_CHUNK) * DATA_CHUNK
        return start, min(stop, max(self.layers[layer].file.size, offset + length)), True

    # -- keeping the cache right as the write path changes the file -----------------------

    def set_bat_entry(self, layer: int, block: int, entry: int) -> None:
        """Record a BAT entry just written to the file (if its page is cached)."""
        self._unmap(layer, block)
        page_no, slot = divmod(block, BAT_PAGE_ENTRIES)
        page: array[int] | None = self._lru.peek((layer, _BAT, page_no))
        if page is not None:
            page[slot] = entry

    def put_bitmap(self, layer: int, block: int, bitmap: SectorBitmap) -> None:
        """Cache the bitmap of a block just written."""
        self._unmap(layer, block)
        self._lru.put((layer, _BITMAP, block), bitmap, bitmap.nbytes)

    def forget_metadata(self, layer: int) -> None:
        """Drop the layer's cached BAT pages and bitmaps.

        Used after a write that may have failed half-way: only the file knows what changed.
        """
        self._lru.discard_where(lambda key: key[0] == layer and key[1] != _DATA)
        self._direct.clear()
        self._direct_extents = 0

    def invalidate_data(self, layer: int, start: int, end: int) -> None:
        """Forget cached data chunks overlapping ``[start, end)`` of the layer's file."""
        self._data_epoch[layer] += 1
        for index in range(start // DATA_CHUNK, (end - 1) // DATA_CHUNK + 1):
            self._lru.discard((layer, _DATA, index))

    def statistics(self) -> CacheStatistics:
        """Counters of the underlying LRU."""
        return self._lru.statistics()
