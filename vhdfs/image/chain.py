"""Chain: a VHD and its ancestors, and the pure mapping of disk ranges onto them.

``Chain.open`` opens the leaf (read-write if asked) and walks up through the parents, which are
always opened read-only. Each parent must carry the unique id its child records. A loop is a
file met twice, by its (device, inode) on the opened descriptor, never a unique id met twice:
MiniVHD seeds ids with the clock, so a child made in the same second as its parent carries
the parent's own id. ``plan_read`` maps a byte range of the virtual disk to extents:
runs of host bytes in one layer, or zeros. It takes each sector from the nearest layer whose
bitmap has it and needs nothing but the metadata it asks ``meta`` for, so it is
tested without FUSE or trio.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, Self

from vhdfs.errors import (
    ChainError,
    ChainLoopError,
    ImageAccessError,
    ImageError,
    ParentIdMismatchError,
    ParentNotFoundError,
)
from vhdfs.format.bitmap import SectorBitmap
from vhdfs.format.layout import SECTOR, UNALLOCATED, DiskType
from vhdfs.image.extents import Extent, merge
from vhdfs.image.locate import parent_candidates
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
    def open(cls, path: str, *, writable: bool = False, lock: bool = True) -> Self:
        """Open ``path`` and every ancestor.

        Args:
            path: The leaf image.
            writable: Open the leaf read-write (parents are always read-only).
            lock: Take OFD locks: exclusive on a writable leaf, shared on everything else.

        Raises:
            ImageError: A layer is unusable.
            ChainError: A parent is missing, has the wrong id, or the chain loops.
        """
        chain, error = cls.open_partial(path, writable=writable, lock=lock)
        if error is not None:
            chain.close()
            raise error
        return chain

    @classmethod
    def open_partial(
        cls, path: str, *, writable: bool = False, lock: bool = True
    ) -> tuple[Self, ChainError | None]:
        """Open as much of the chain as possible, for reports.

        Returns:
            The chain of the layers that opened, and the error that stopped the walk (the
            chain is incomplete and must not serve reads then).

        Raises:
            ImageError: A layer is unusable (including the parents: a broken parent file is
                an image problem, not a missing link).
        """
        leaf = VhdImage.open(path, writable=writable)
        layers = [leaf]
        links: list[ParentLink] = []
        error: ChainError | None = None
        try:
            if lock:
                leaf.file.lock(exclusive=writable)
            seen = {_identity(leaf.file.fd)}
            current = leaf
            while current.kind == DiskType.DIFFERENCING:
                if len(layers) >= MAX_CHAIN_DEPTH:
                    raise ChainLoopError(path, f"chain is deeper than {MAX_CHAIN_DEPTH} images")
                parent, link = _open_parent(current, seen)
                layers.append(parent)
                links.append(link)
                if lock:
                    parent.file.lock(exclusive=False)
                seen.add(_identity(parent.file.fd))
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

    def iter_layers(self) -> Iterator[tuple[VhdImage, ParentLink | None]]:
        """Each layer with the link that found it (``None`` for the leaf)."""
        yield self.layers[0], None
        yield from zip(self.layers[1:], self.links, strict=True)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _exists(path: str) -> bool:
    """Whether a candidate names anything at all (a locator may hold a NUL byte)."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _open_parent(child: VhdImage, seen: set[tuple[int, int]]) -> tuple[VhdImage, ParentLink]:
    header = child.header
    assert header is not None
    expected = header.parent_unique_id
    tried: list[str] = []
    mismatched: list[str] = []
    broken: list[ImageError] = []
    for candidate in parent_candidates(child):
        if not _exists(candidate.path):
            tried.append(candidate.path)
            continue
        try:
            parent = VhdImage.open(candidate.path, writable=False)
        except ImageAccessError as exc:
            # Not a file that could be a parent (a FIFO, a directory...): keep looking.
            tried.append(f"{candidate.path} ({exc.message})")
            continue
        except ImageError as exc:
            tried.append(candidate.path)
            broken.append(exc)
            continue
        if _identity(parent.file.fd) in seen:
            parent.close()
            raise ChainLoopError(
                child.path,
                f"{candidate.source} points at {candidate.path}, which is already in the chain",
            )
        if parent.footer.unique_id != expected:
            mismatched.append(f"{candidate.path} has id {parent.footer.unique_id.hex()}")
            parent.close()
            continue
        return parent, ParentLink(candidate.path, candidate.source)
    if mismatched:
        raise ParentIdMismatchError(
            child.path,
            f"parent unique id {expected.hex()} not found: " + "; ".join(mismatched),
        )
    if broken:
        raise broken[0]
    name = header.parent_name or "(no name)"
    raise ParentNotFoundError(
        child.path,
        f"parent {name!r} not found; tried: " + (", ".join(tried) or "no locator or name"),
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
