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

Beside them sits the direct map: for each leaf block read recently, the one extent that answers
any read inside it (``Chain.direct`` run once over the whole block), so the commonest read costs
one dict lookup. It holds at most ``DIRECT_MAP_LIMIT`` blocks and is kept right by the same
calls that keep the metadata right (``set_bat_entry``, ``put_bitmap``, ``forget_metadata``).

Thread safety: used only from the trio thread, and no method awaits, so no lock is needed.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Any, NamedTuple

from vhdfs.cache.lru import CacheStatistics, LruCache
from vhdfs.errors import HostIOError
from vhdfs.format.bat import BAT_PAGE_ENTRIES
from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import UNALLOCATED, DiskType
from vhdfs.image.chain import Chain
from vhdfs.image.extents import Extent

#: Default budget (``-o cache_size=``).
DEFAULT_CACHE_SIZE = 64 << 20
#: Smallest budget accepted: enough for the metadata of any request.
MIN_CACHE_SIZE = 1 << 20
#: Granularity of cached data, in bytes of the host file (chosen by measurement: larger chunks
#: cost more copying per small read).
DATA_CHUNK = 16 << 10
#: Host runs longer than this bypass the data cache.
CACHED_READ_LIMIT = 64 << 10

#: Leaf blocks the direct map remembers (about 150 bytes each); when full it starts over.
DIRECT_MAP_LIMIT = 1 << 15

_BAT = 0
_BITMAP = 1
_DATA = 2

CacheKey = tuple[int, int, int]

#: Direct-map value of a block no single layer answers whole: each read asks ``Chain.direct``.
_MIXED: tuple[int | None, int] = (-1, 0)
#: Direct-map value of a block that reads as zeros.
_ZEROS: tuple[int | None, int] = (None, 0)


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
        max_bytes: Budget for everything cached (see ``DEFAULT_CACHE_SIZE``).
    """

    def __init__(self, chain: Chain, max_bytes: int = DEFAULT_CACHE_SIZE) -> None:
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
        # Leaf block -> (layer, host offset minus disk offset), (None, 0) or _MIXED.
        self._direct: dict[int, tuple[int | None, int]] = {}
        leaf = chain.leaf
        self._unit = 0 if leaf.kind == DiskType.FIXED else leaf.block_size

    # -- the direct map ------------------------------------------------------------------

    def direct(self, offset: int, length: int) -> Extent | None:
        """``Chain.direct`` for ``[offset, offset + length)``, from the direct map when it can."""
        unit = self._unit
        index, within = divmod(offset, unit) if unit else (0, -1)
        if within < 0 or within + length > unit:
            return self.chain.direct(offset, offset + length, self)
        found = self._direct.get(index)
        if found is None:
            found = self._map_block(index)
        if found is _MIXED:
            return self.chain.direct(offset, offset + length, self)
        layer, delta = found
        return Extent(offset, length, layer, 0 if layer is None else offset + delta)

    def _map_block(self, index: int) -> tuple[int | None, int]:
        start = index * self._unit
        end = min(start + self._unit, self.chain.virtual_size)
        extent = self.chain.direct(start, end, self)
        if extent is None:
            found = _MIXED
        elif extent.layer is None:
            found = _ZEROS
        else:
            found = (extent.layer, extent.host - start)
        if len(self._direct) >= DIRECT_MAP_LIMIT:
            self._direct.clear()
        self._direct[index] = found
        return found

    def _unmap(self, layer: int, block: int) -> None:
        """Forget what the direct map knows that metadata of ``layer``'s ``block`` decided."""
        if layer == 0:
            self._direct.pop(block, None)
        else:
            self._direct.clear()  # a parent's block sizes need not match the leaf's

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

    def invalidate_data(self, layer: int, start: int, end: int) -> None:
        """Forget cached data chunks overlapping ``[start, end)`` of the layer's file."""
        self._data_epoch[layer] += 1
        for index in range(start // DATA_CHUNK, (end - 1) // DATA_CHUNK + 1):
            self._lru.discard((layer, _DATA, index))

    def statistics(self) -> CacheStatistics:
        """Counters of the underlying LRU."""
        return self._lru.statistics()
