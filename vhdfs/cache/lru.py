"""A least-recently-used map with a byte budget instead of an entry count.

Synchronous and single-threaded: it is only touched from the trio thread, between
checkpoints, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Rough per-entry cost of the bookkeeping (dict slot, tuple, key), charged with each entry.
ENTRY_OVERHEAD = 128


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of the cache counters."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class LruCache(Generic[K, V]):
    """Map keys to values, evicting the least recently used once ``max_bytes`` is exceeded.

    Args:
        max_bytes: Budget for the sizes given to :meth:`put` (plus ``ENTRY_OVERHEAD`` each).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """Return the value for ``key`` and mark it recently used, or ``None``."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def peek(self, key: K) -> V | None:
        """Return the value for ``key`` without touching its age or the counters."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Insert or replace ``key``, then evict old entries until the budget holds.

        An entry larger than the whole budget is not kept.
        """
        cost = size + ENTRY_OVERHEAD
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if cost > self.max_bytes:
            return
        self._items[key] = (value, cost)
        self._bytes += cost
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self._bytes -= evicted
            self.evictions += 1

    def discard(self, key: K) -> None:
        """Forget ``key`` if present."""
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]

    def discard_where(self, predicate: Callable[[K], bool]) -> None:
        """Forget every key for which ``predicate`` is true."""
        for key in [key for key in self._items if predicate(key)]:
            self.discard(key)

    def __len__(self) -> int:
        return len(self._items)

    def statistics(self) -> CacheStatistics:
        """Current counters."""
        return CacheStatistics(
            entries=len(self._items),
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
        )
