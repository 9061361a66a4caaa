"""DirtyPages: acknowledged writes held in memory until they are committed to the image.

Writes land here as whole sectors of the virtual disk, in 4 KiB pages, each with a mask of the
sectors it holds (partial sectors are completed by the caller with the current contents first,
so a page never holds half a sector). Reads take the dirty sectors over whatever the image
says. A page written whole is a view of the buffer the write arrived in, never a copy; memory
is accounted per buffer (see ``DirtyPages``).

Single-threaded: used only on the trio thread, and no method awaits.
"""

from __future__ import annotations

from collections.abc import Iterator

from vhdfs.format.layout import SECTOR
from vhdfs.image.steps import Chunks

PAGE = 4096
_SECTORS_PER_PAGE = PAGE // SECTOR
_FULL_MASK = (1 << _SECTORS_PER_PAGE) - 1


def _mask_runs(mask: int) -> tuple[tuple[int, int], ...]:
    runs = []
    sector = 0
    while sector < _SECTORS_PER_PAGE:
        if mask >> sector & 1:
            start = sector
            while sector < _SECTORS_PER_PAGE and mask >> sector & 1:
                sector += 1
            runs.append((start, sector - start))
        else:
            sector += 1
    return tuple(runs)


#: Runs of set sectors, ``(first, count)``, for every possible page mask.
_RUNS = tuple(_mask_runs(mask) for mask in range(1 << _SECTORS_PER_PAGE))


class _Page:
    """One dirty page.

    A page written whole is a view into the buffer the write arrived in (no copy: a 1 MiB
    write becomes 256 views of one buffer); ``owner`` is that buffer. A partly written page
    is a zero-filled bytearray of its own. ``mask`` has a bit per sector held.
    """

    __slots__ = ("data", "mask", "owner", "pos")

    def __init__(
        self, data: memoryview | bytearray, mask: int, owner: object = None, pos: int = 0
    ) -> None:
        self.data = data
        self.mask = mask
        self.owner = owner
        #: Where ``data`` starts in ``owner``: ``runs`` joins pages that continue each other.
        self.pos = pos


class DirtyPages:
    """Dirty sectors of one disk, in 4 KiB pages keyed by page number.

    ``size`` is the memory really held: every buffer some page still views, counted once
    however many pages view it, plus the pages of their own. So a page overwritten later
    frees nothing until the rest of its buffer is gone too, and ``size`` says so.
    """

    def __init__(self) -> None:
        self.pages: dict[int, _Page] = {}
        self._owners: dict[int, list[object]] = {}  # id -> [buffer, pages viewing it]
        self.size = 0

    def _hold(self, page_no: int, page: _Page) -> None:
        old = self.pages.get(page_no)
        if old is not None:
            self._release(old)
        self.pages[page_no] = page
        if page.owner is None:
            self.size += PAGE
            return
        entry = self._owners.get(id(page.owner))
        if entry is None:
            self._owners[id(page.owner)] = [page.owner, 1]
            self.size += len(page.owner)  # type: ignore[arg-type]
        else:
            entry[1] += 1  # type: ignore[operator]

    def _release(self, page: _Page) -> None:
        if page.owner is None:
            self.size -= PAGE
            return
        entry = self._owners[id(page.owner)]
        entry[1] -= 1  # type: ignore[operator]
        if entry[1] == 0:
            del self._owners[id(page.owner)]
            self.size -= len(page.owner)  # type: ignore[arg-type]

    def store(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` (whole sectors at a sector-aligned ``offset``) as dirty.

        The caller hands ``data`` over: it must not change it afterwards (pyfuse3 passes each
        write as a fresh ``bytes`` object, which nothing else holds).
        """
        view = memoryview(data)
        end = offset + len(view)
        first_full = -(-offset // PAGE)
        last_full = end // PAGE  # exclusive
        if first_full >= last_full:
            self._store_partial(offset, view)
            return
        head = first_full * PAGE - offset
        if head:
            self._store_partial(offset, view[:head])
        # Whole pages: views of the caller's buffer, which is held once for all of them.
        pages = self.pages
        pos = head
        for number in range(first_full, last_full):
            old = pages.get(number)
            if old is not None:
                self._release(old)
            pages[number] = _Page(view[pos : pos + PAGE], _FULL_MASK, data, pos)
            pos += PAGE
        entry = self._owners.get(id(data))
        if entry is None:
            self._owners[id(data)] = [data, last_full - first_full]
            self.size += len(data)
        else:
            entry[1] += last_full - first_full  # type: ignore[operator]
        if end > last_full * PAGE:
            self._store_partial(last_full * PAGE, view[last_full * PAGE - offset :])

    def _store_partial(self, offset: int, view: memoryview) -> None:
        """Keep sectors that fill no page whole, each page's in a page of its own."""
        pos = 0
        while pos < len(view):
            page_no, within = divmod(offset + pos, PAGE)
            count = min(PAGE - within, len(view) - pos)
            page = self.pages.get(page_no)
            if page is None or page.owner is not None:
                own = _Page(bytearray(PAGE) if page is None else bytearray(page.data), 0)
                own.mask = 0 if page is None else page.mask
                self._hold(page_no, own)
                page = own
            page.data[within : within + count] = view[pos : pos + count]
            page.mask |= ((1 << (count // SECTOR)) - 1) << (within // SECTOR)
            pos += count

    def overlaps(self, offset: int, length: int) -> bool:
        """True when some page of ``[offset, offset + length)`` holds dirty sectors."""
        pages = self.pages
        if not pages:
            return False
        first, last = offset // PAGE, (offset + length - 1) // PAGE
        if last - first >= len(pages):
            return any(first <= page_no <= last for page_no in pages)
        return any(page_no in pages for page_no in range(first, last + 1))

    def patches(self, offset: int, length: int) -> list[tuple[int, bytes]]:
        """Dirty sectors within ``[offset, offset + length)``, as ``(disk offset, bytes)``."""
        out = []
        end = offset + length
        pages = self.pages
        for page_no in range(offset // PAGE, (end - 1) // PAGE + 1):
            page = pages.get(page_no)
            if page is None:
                continue
            base = page_no * PAGE
            for first, count in _RUNS[page.mask]:
                start = max(base + first * SECTOR, offset)
                stop = min(base + (first + count) * SECTOR, end)
                if start < stop:
                    out.append((start, bytes(page.data[start - base : stop - base])))
        return out

    def runs(self) -> Iterator[tuple[int, Chunks]]:
        """Every dirty run of consecutive sectors, in disk order, as ``(offset, chunks)``."""
        run_start = -1
        run_end = -1
        parts: Chunks = []
        # Whole pages that continue each other in one buffer become one chunk: a 1 MiB
        # write is one chunk again, not 256.
        owner: object = None
        owner_start = owner_end = 0
        for page_no in sorted(self.pages):
            page = self.pages[page_no]
            base = page_no * PAGE
            if base != run_end:
                if owner is not None:
                    parts.append(memoryview(owner)[owner_start:owner_end])  # type: ignore[arg-type]
                    owner = None
                if parts:
                    yield run_start, parts
                run_start, parts = base + _RUNS[page.mask][0][0] * SECTOR, []
            if page.owner is not None:
                if owner is page.owner and page.pos == owner_end:
                    owner_end += PAGE
                else:
                    if owner is not None:
                        parts.append(memoryview(owner)[owner_start:owner_end])  # type: ignore[arg-type]
                    owner, owner_start, owner_end = page.owner, page.pos, page.pos + PAGE
                run_end = base + PAGE
                continue
            if owner is not None:
                parts.append(memoryview(owner)[owner_start:owner_end])  # type: ignore[arg-type]
                owner = None
            view = memoryview(page.data)
            for first, count in _RUNS[page.mask]:
                start = base + first * SECTOR
                if start != run_end:
                    if parts:
                        yield run_start, parts
                    run_start, parts = start, []
                parts.append(view[first * SECTOR : (first + count) * SECTOR])
                run_end = start + count * SECTOR
        if owner is not None:
            parts.append(memoryview(owner)[owner_start:owner_end])  # type: ignore[arg-type]
        if parts:
            yield run_start, parts

    def absorb_older(self, older: DirtyPages) -> None:
        """Add the sectors of ``older`` that this set does not hold (after a failed flush)."""
        for page_no, old in older.pages.items():
            page = self.pages.get(page_no)
            if page is None:
                self._hold(page_no, old)
                continue
            missing = old.mask & ~page.mask & _FULL_MASK
            if not missing:
                continue
            if page.owner is not None:
                own = _Page(bytearray(page.data), page.mask)
                self._hold(page_no, own)
                page = own
            assert isinstance(page.data, bytearray)
            for first, count in _RUNS[missing]:
                a, b = first * SECTOR, (first + count) * SECTOR
                page.data[a:b] = old.data[a:b]
            page.mask |= old.mask
