"""Chain: a VHD and its ancestors, and the pure mapping of disk ranges onto them.

``Chain.open`` opens the leaf (read-write if asked) and walks up through the parents, which are
always opened read-only. Each parent must carry the unique id its child records. A loop is a
file met twice, by its (device, inode) on the opened descriptor, never a unique id met twice:
MiniVHD seeds ids with the clock, so a child made in the same second as its parent carries
the parent's own id. ``plan_read`` maps a byte range of the virtual disk to extents:
runs of host bytes in one layer, or zeros. It takes each sector from the nearest layer whose
bitmap has it and needs nothing but the metadata it asks ``meta`` for, so it is
tested without FUSE or trio.

What the walk says about a candidate that is not the parent is only what the child's maker
could know anyway: its path, and whether it is missing, outside the folder parents are
confined to, not a file, or not the VHD the child records. Never its unique id, size or type
of disk, nor why it does not open as a VHD: a locator may name any file the user can read, and
the unique id of the image to be read through a child is what such a child must get right.
Finding and opening each file is bounded in time (``bounded``): a locator may point into a
stalled mount.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol, Self

from vhdfs.errors import (
    ChainError,
    ChainLoopError,
    ImageAccessError,
    ImageError,
    ParentIdMismatchError,
    ParentNotFoundError,
    UsageError,
)
from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import SECTOR, UNALLOCATED, DiskType
from vhdfs.image.bounded import LOOKUP_TIME_LIMIT, bounded
from vhdfs.image.extents import Extent, merge
from vhdfs.image.footer import locate_footer
from vhdfs.image.hostfile import HostFile
from vhdfs.image.locate import Candidate, parent_candidates
from vhdfs.image.vhd import VhdImage

log = logging.getLogger(__name__)

#: Deepest chain accepted: a guard against pathological files, far beyond real snapshot trees.
MAX_CHAIN_DEPTH = 1024


class MetaSource(Protocol):
    """Synchronous access to the metadata of the chain's layers (the block cache)."""

    def bat_entry(self, layer: int, block: int) -> int:
        """BAT entry of ``block`` in layer ``layer`` (UNALLOCATED if none)."""

    def bitmap(self, layer: int, block: int, entry: int) -> SectorBitmap:
        """Sector bitmap of ``block`` (whose BAT entry is ``entry``) in layer ``layer``."""


@dataclass(frozen=True, slots=True)
class ParentLink:
    """How a layer's parent was found, for ``vhd info``."""

    path: str
    found_by: str


class Chain:
    """A leaf image and its parents, nearest first.

    Attributes:
        layers: ``layers[0]`` is the leaf; ``layers[-1]`` is a fixed or dynamic base.
        links: ``links[i]`` tells how ``layers[i + 1]`` was found.
    """

    def __init__(self, layers: list[VhdImage], links: list[ParentLink]) -> None:
        self.layers = layers
        self.links = links
        self.leaf = layers[0]
        self.virtual_size = self.leaf.virtual_size

    @classmethod
    def open(
        cls,
        path: str,
        *,
        writable: bool = False,
        lock: bool = True,
        parents: str | None = None,
        time_limit: float = LOOKUP_TIME_LIMIT,
    ) -> Self:
        """Open ``path`` and every ancestor.

        Args:
            path: The leaf image.
            writable: Open the leaf read-write (parents are always read-only).
            lock: Take OFD locks: exclusive on a writable leaf, shared on everything else.
            parents: Open only parents whose real path (symbolic links and ``..`` resolved)
                lies inside this folder; others are not opened at all. ``None``: anywhere.
            time_limit: Seconds that finding and opening one file may take.

        Raises:
            ImageError: A layer is unusable.
            ChainError: A parent is missing, has the wrong id, or the chain loops.
            StalledPathError: A file gave no answer within ``time_limit``.
            UsageError: ``parents`` is not a folder.
        """
        chain, error = cls.open_partial(
            path, writable=writable, lock=lock, parents=parents, time_limit=time_limit
        )
        if error is not None:
            chain.close()
            raise error
        return chain

    @classmethod
    def open_partial(
        cls,
        path: str,
        *,
        writable: bool = False,
        lock: bool = True,
        parents: str | None = None,
        time_limit: float = LOOKUP_TIME_LIMIT,
    ) -> tuple[Self, ChainError | None]:
        """Open as much of the chain as possible, for reports (arguments as for ``open``).

        Returns:
            The chain of the layers that opened, and the error that stopped the walk (the
            chain is incomplete and must not serve reads then).

        Raises:
            ImageError: A layer is unusable (including the parents: a broken parent file is
                an image problem, not a missing link).
            StalledPathError: A file gave no answer within ``time_limit``.
            UsageError: ``parents`` is not a folder.
        """
        search = _Search(_confinement(parents, time_limit), time_limit, lock)
        leaf, identity = bounded(
            partial(_open_leaf, path, writable, lock), path=path, limit=time_limit, discard=_drop
        )
        layers = [leaf]
        links: list[ParentLink] = []
        error: ChainError | None = None
        try:
            seen = {identity}
            current = leaf
            while current.kind == DiskType.DIFFERENCING:
                if len(layers) >= MAX_CHAIN_DEPTH:
                    raise ChainLoopError(path, f"chain is deeper than {MAX_CHAIN_DEPTH} images")
                parent, identity, link = _open_parent(current, seen, search)
                layers.append(parent)
                links.append(link)
                seen.add(identity)
                current = parent
        except ChainError as exc:
            error = exc
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(layers, links), error

    def close(self) -> None:
        """Close every layer."""
        for layer in self.layers:
            layer.close()

    def plan_read(self, offset: int, length: int, meta: MetaSource) -> list[Extent]:
        """Map ``[offset, offset + length)`` of the virtual disk to extents, in disk order.

        Adjacent extents of one layer that are contiguous in its file are merged, so each
        contiguous allocated run becomes one host read; adjacent zero extents are merged too.
        """
        end = min(offset + length, self.virtual_size)
        if end <= offset:
            return []
        quick = self.direct(offset, end, meta)
        if quick is not None:
            return [quick]
        out: list[Extent] = []
        pending = [(offset, end - offset)]
        for index, layer in enumerate(self.layers):
            below: list[tuple[int, int]] = []
            for start, count in pending:
                _map_layer(index, layer, start, count, meta, out, below)
            pending = below
            if not pending:
                break
        for start, count in pending:
            out.append(Extent.zeros(start, count))
        return merge(out)

    def direct(self, offset: int, end: int, meta: MetaSource) -> Extent | None:
        """The one extent of a request that one layer answers whole, or ``None``.

        The commonest request lies inside one block of every layer it reaches, and the first
        layer that has any of its sectors has all of them (or it reads as zeros). It is mapped
        here, walking down the chain, without the general machinery of ``plan_read``; any
        other request returns ``None`` (docs/performance.md has what this saves).
        """
        count = end - offset
        for index, layer in enumerate(self.layers):
            if end > layer.virtual_size:
                return None  # partly past this layer's end: the general path cuts it
            if layer.kind == DiskType.FIXED:
                return Extent(offset, count, index, offset)
            block, start = divmod(offset, layer.block_size)
            if (end - 1) // layer.block_size != block:
                return None
            entry = meta.bat_entry(index, block)
            if entry != UNALLOCATED:
                first = start // SECTOR
                sectors = (start + count + SECTOR - 1) // SECTOR - first
                bitmap = meta.bitmap(index, block, entry)
                if bitmap.is_full(first, sectors):
                    return Extent(offset, count, index, entry * SECTOR + layer.bitmap_size + start)
                if not bitmap.is_empty(first, sectors):
                    return None  # some sectors here, some below
            if layer.kind == DiskType.DYNAMIC:
                return Extent.zeros(offset, count)
        return Extent.zeros(offset, count)

    def allocated_bytes(self) -> int:
        """How much of the disk the layers hold data for: what ``du`` of the raw file shows.

        All of it under a fixed layer, else the allocated blocks of every layer added up (an
        upper bound where layers overlap), never more than the disk.
        """
        if any(layer.kind == DiskType.FIXED for layer in self.layers):
            return self.virtual_size
        held = sum(layer.allocated_blocks * layer.block_size for layer in self.layers)
        return min(self.virtual_size, held)

    def iter_layers(self) -> Iterator[tuple[VhdImage, ParentLink | None]]:
        """Each layer with the link that found it (``None`` for the leaf)."""
        yield self.layers[0], None
        yield from zip(self.layers[1:], self.links, strict=True)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _drop(opened: tuple[VhdImage, tuple[int, int]]) -> None:
    opened[0].close()


def _open_leaf(path: str, writable: bool, lock: bool) -> tuple[VhdImage, tuple[int, int]]:
    """Open and lock the leaf; return it with its (device, inode). Runs in ``bounded``."""
    image = VhdImage.open(path, writable=writable)
    try:
        if lock:
            image.file.lock(exclusive=writable)
        return image, _identity(image.file.fd)
    except BaseException:
        image.close()
        raise


@dataclass(frozen=True, slots=True)
class _Confinement:
    """The folder parents must lie in: as given (for messages) and its real path."""

    given: str
    real: str

    def holds(self, real_path: str) -> bool:
        return real_path == self.real or real_path.startswith(self.real.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class _Search:
    """How parents are looked for: where, how long each may take, and whether to lock."""

    confinement: _Confinement | None
    time_limit: float
    lock: bool


def _confinement(folder: str | None, time_limit: float) -> _Confinement | None:
    if folder is None:
        return None

    def resolve() -> str | None:
        try:
            real = os.path.realpath(folder)
            return real if os.path.isdir(real) else None
        except (OSError, ValueError):
            return None

    real = bounded(resolve, path=folder, limit=time_limit)
    if real is None:
        raise UsageError(folder, "not a folder, so parents cannot be confined to it")
    return _Confinement(folder, real)


def _exists(path: str) -> bool:
    """Whether a candidate names anything at all (a locator may hold a NUL byte)."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _real_path(path: str) -> str | None:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # a NUL byte; a loop of symbolic links
        return None


def _opened_inside(fd: int, confinement: _Confinement) -> bool:
    """Whether the file behind ``fd`` lies inside the folder, by what the kernel opened.

    This closes the gap between resolving a candidate's path and opening it (a symbolic
    link replaced in between). Without /proc the check made before the open stands.
    """
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return confinement.holds(opened)


def _recorded_id(path: str) -> bytes | None:
    """The unique id in the footer of a file that failed to open as a VHD, if it has one."""
    try:
        file = HostFile.open(path, writable=False)
    except ImageAccessError:
        return None
    try:
        return locate_footer(file).footer.unique_id
    except ImageError:
        return None
    finally:
        file.close()


@dataclass(frozen=True, slots=True)
class _Miss:
    """A candidate that is not the parent, and what may be said about it."""

    path: str
    #: ``missing``, ``outside``, ``unopenable``, ``unusable``, ``other-id`` or ``damaged``.
    reason: str
    note: str = ""
    #: Why the parent itself (``damaged``: the unique id the child records) does not open.
    error: ImageError | None = None

    def __str__(self) -> str:
        return f"{self.path} ({self.note})" if self.note else self.path


_Found = tuple[VhdImage, tuple[int, int]]


def _probe(
    candidate: Candidate,
    child: VhdImage,
    expected: bytes,
    seen: frozenset[tuple[int, int]],
    search: _Search,
) -> _Found | _Miss:
    """Look at one candidate: the parent, opened and locked, or why it is not. In ``bounded``.

    Raises:
        ChainLoopError: The candidate is a file already in the chain.
        ImageBusyError: The parent is being written by another program.
    """
    path = candidate.path
    confinement = search.confinement
    if confinement is not None:
        real = _real_path(path)
        if real is None:
            return _Miss(path, "missing")
        if not confinement.holds(real):
            return _Miss(path, "outside", f"outside {confinement.given}; not opened")
    if not _exists(path):
        return _Miss(path, "missing")
    try:
        image = VhdImage.open(path, writable=False)
    except ImageAccessError as exc:
        # Not a file that could be a parent (a FIFO, a directory...): keep looking.
        return _Miss(path, "unopenable", exc.message)
    except ImageError as exc:
        if _recorded_id(path) == expected:
            # The parent itself, damaged: say how, unless another candidate is a good copy.
            return _Miss(path, "damaged", error=exc)
        # Any readable file may be named here: what is wrong with it is not for the
        # child's maker to learn.
        return _Miss(path, "unusable", "not a usable VHD")
    try:
        if confinement is not None and not _opened_inside(image.file.fd, confinement):
            image.close()
            return _Miss(path, "outside", f"outside {confinement.given}; not opened")
        identity = _identity(image.file.fd)
        if identity in seen:
            raise ChainLoopError(
                child.path,
                f"{candidate.source} points at {path}, which is already in the chain",
            )
        if image.footer.unique_id != expected:
            image.close()
            return _Miss(path, "other-id")
        if search.lock:
            image.file.lock(exclusive=False)
    except BaseException:
        image.close()
        raise
    return image, identity


def _drop_found(found: _Found | _Miss) -> None:
    if not isinstance(found, _Miss):
        found[0].close()


def _open_parent(
    child: VhdImage, seen: set[tuple[int, int]], search: _Search
) -> tuple[VhdImage, tuple[int, int], ParentLink]:
    header = child.header
    assert header is not None
    expected = header.parent_unique_id
    purpose = f"the parent of {child.path}"
    candidates = bounded(
        partial(parent_candidates, child),
        path=child.path,
        limit=search.time_limit,
        purpose=purpose,
    )
    misses: list[_Miss] = []
    for candidate in candidates:
        found = bounded(
            partial(_probe, candidate, child, expected, frozenset(seen), search),
            path=candidate.path,
            limit=search.time_limit,
            discard=_drop_found,
            purpose=purpose,
        )
        if isinstance(found, _Miss):
            misses.append(found)
            continue
        parent, identity = found
        return parent, identity, ParentLink(candidate.path, candidate.source)
    raise _not_found(child.path, header.parent_name or "(no name)", misses, search)


def _not_found(
    child: str, name: str, misses: list[_Miss], search: _Search
) -> ImageError | ParentNotFoundError | ParentIdMismatchError:
    """The error that says where the parent was looked for, and nothing about those files.

    Only a file that carries the unique id the child records, but does not open, is
    described: it is the parent.
    """
    for miss in misses:
        if miss.error is not None:
            return miss.error
    other_id = [m.path for m in misses if m.reason == "other-id"]
    rest = [str(m) for m in misses if m.reason != "other-id"]
    if other_id:
        if len(other_id) == 1:
            text = f"{other_id[0]} is a VHD, but its unique id is not the one this image records"
        else:
            text = (
                f"{', '.join(other_id)} are VHDs, but their unique ids are not the one this "
                "image records"
            )
        also = f"; also tried: {', '.join(rest)}" if rest else ""
        return ParentIdMismatchError(child, f"parent {name!r} not found: {text}{also}")
    confinement = search.confinement
    if misses and confinement is not None and all(m.reason == "outside" for m in misses):
        return ParentNotFoundError(
            child,
            f"parent {name!r} not found inside {confinement.given}: every candidate lies "
            f"outside it and was not opened: {', '.join(m.path for m in misses)}",
        )
    return ParentNotFoundError(
        child, f"parent {name!r} not found; tried: " + (", ".join(rest) or "no locator or name")
    )


def _map_layer(
    index: int,
    layer: VhdImage,
    start: int,
    count: int,
    meta: MetaSource,
    out: list[Extent],
    below: list[tuple[int, int]],
) -> None:
    """Map one range through one layer: hits go to ``out``, fall-through ranges to ``below``."""
    size = layer.virtual_size
    end = start + count
    if end > size:
        # Past this layer's end the disk reads as zeros (a child may outgrow its parent).
        tail = max(start, size)
        out.append(Extent.zeros(tail, end - tail))
        end = tail
    if start >= end:
        return
    if layer.kind == DiskType.FIXED:
        out.append(Extent(start, end - start, index, start))
        return
    # Sectors a differencing layer lacks come from its parent; a dynamic layer's are zeros.
    falls = below if layer.kind == DiskType.DIFFERENCING else None
    block_size = layer.block_size
    pos = start
    while pos < end:
        block = pos // block_size
        block_start = block * block_size
        stop = min(block_start + block_size, end)
        entry = meta.bat_entry(index, block)
        if entry == UNALLOCATED:
            _miss(pos, stop - pos, falls, out)
        else:
            data = entry * SECTOR + layer.bitmap_size - block_start
            first = (pos - block_start) // SECTOR
            last = (stop - block_start + SECTOR - 1) // SECTOR
            for sector, sectors, present in meta.bitmap(index, block, entry).runs(
                first, last - first
            ):
                a = max(block_start + sector * SECTOR, pos)
                b = min(block_start + (sector + sectors) * SECTOR, stop)
                if present:
                    out.append(Extent(a, b - a, index, data + a))
                else:
                    _miss(a, b - a, falls, out)
        pos = stop


def _miss(start: int, count: int, falls: list[tuple[int, int]] | None, out: list[Extent]) -> None:
    if falls is None:
        out.append(Extent.zeros(start, count))
    else:
        falls.append((start, count))
