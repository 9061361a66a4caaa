"""``vhd commit``: write a differencing image's data into its parent, like ``qemu-img commit``.

For one level, in this order: every sector the child holds is written into the parent
through the parent's own write path (``vhdfs.image.commit`` plans, so the parent stays valid
at every instant), and the parent is synced; only then is the child emptied
(``vhdfs.image.reshape.plan_empty``) or removed. At every instant the chain through the child
reads the same bytes: while the parent changes, the child still holds those sectors; once
the parent holds them durably, the child may let go. A rerun after an interruption copies
again what the child still holds and finishes the job.

With ``all_levels`` the parent is then committed into its own parent, and so on down to the
base. Both files of a level are locked as writers, so a mounted one is refused. Other
children of a parent are not this tool's to know: they read the changed parent from then on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from vhdfs import faults
from vhdfs.disk.virtual import DiskOptions, VirtualDisk, open_disk
from vhdfs.errors import ImageError, ParentIdMismatchError, UsageError
from vhdfs.format.layout import SECTOR, DiskType
from vhdfs.image.chain import Chain
from vhdfs.image.reshape import plan_empty
from vhdfs.image.vhd import VhdImage
from vhdfs.tools.apply import apply
from vhdfs.tools.shape import allocated_blocks, shape_of

#: Bytes read from the child per write into the parent: a tool's memory stays bounded by
#: the parent's dirty limit plus this, however large the blocks are.
COPY_CHUNK = 4 << 20

#: ``progress(bytes done, bytes in all)``.
Progress = Callable[[int, int], None]


@dataclass
class CommitReport:
    """What ``commit`` did, level by level."""

    image: str
    #: ``(child, parent)`` of every level committed, child first.
    levels: list[tuple[str, str]] = field(default_factory=list)
    bytes_committed: int = 0
    removed: list[str] = field(default_factory=list)


async def commit(
    path: str,
    *,
    all_levels: bool = False,
    remove: bool = False,
    progress: Progress | None = None,
    parents: str | None = None,
) -> CommitReport:
    """Commit the differencing image ``path`` into its parent (and further, ``all_levels``).

    ``parents`` confines every parent to a folder (``Chain.open``).

    Raises:
        UsageError: ``path`` is not a differencing image.
        VhdfsError: The chain is broken, an image is in use or unsafe to write, host I/O.
    """
    report = CommitReport(path)
    child = path
    while True:
        parent = _parent_of(child, parents)
        done = await _commit_level(child, parent, remove, progress, parents)
        report.levels.append((child, parent))
        report.bytes_committed += done
        if remove:
            report.removed.append(child)
        if not all_levels or _kind(parent) != DiskType.DIFFERENCING:
            return report
        child = parent


def _parent_of(path: str, parents: str | None) -> str:
    chain = Chain.open(path, lock=False, parents=parents)
    try:
        if chain.leaf.kind != DiskType.DIFFERENCING:
            raise UsageError(path, "not a differencing image: it has no parent to commit into")
        return chain.links[0].path
    finally:
        chain.close()


def _kind(path: str) -> DiskType:
    image = VhdImage.open(path)
    try:
        return image.kind
    finally:
        image.close()


async def _commit_level(
    child_path: str,
    parent_path: str,
    remove: bool,
    progress: Progress | None,
    parents: str | None,
) -> int:
    child = VhdImage.open(child_path, writable=True)
    try:
        child.file.lock(exclusive=True)
        problem = child.write_problem()
        if problem is not None:
            raise ImageError(child_path, f"cannot commit: {problem}")
        # Offline: the parent's write-back writes out as the copy goes, in the order of
        # vhdfs.image.commit (no flusher task runs in a tool); the durable flush below makes
        # it all durable before the child lets go of anything.
        options = DiskOptions(explicit_rw=True, offline=True, parents=parents)
        parent = open_disk(parent_path, options)
        try:
            assert child.header is not None
            if parent.chain.leaf.footer.unique_id != child.header.parent_unique_id:
                raise ParentIdMismatchError(child_path, f"{parent_path} is not its parent any more")
            if child.virtual_size > parent.size:
                raise UsageError(
                    child_path,
                    f"is larger than its parent ({child.virtual_size} > {parent.size} bytes): "
                    "resize the parent first",
                )
            done = await _copy_into(child, parent, progress)
            await parent.flush(durable=True)
        finally:
            await parent.aclose()
        faults.crash_point("commit-parent-synced")
        if remove:
            child.close()
            os.unlink(child_path)
            _sync_folder(child_path)
        else:
            apply(plan_empty(shape_of(child)), child.file)
        return done
    finally:
        child.close()


async def _copy_into(child: VhdImage, parent: VirtualDisk, progress: Progress | None) -> int:
    """Write every sector ``child`` holds into the disk ``parent``; return the bytes."""
    blocks = allocated_blocks(child)
    runs = []
    for block, entry in blocks:
        bitmap = child.read_bitmap(entry)
        for first, count, present in bitmap.runs(0, child.sectors_per_block):
            if present:
                runs.append((block, entry, first, count))
    total = sum(count * SECTOR for *_, count in runs)
    done = 0
    for block, entry, first, count in runs:
        offset = block * child.block_size + first * SECTOR
        length = min(count * SECTOR, child.virtual_size - offset)
        host = child.data_offset(entry) + first * SECTOR
        for start in range(0, max(length, 0), COPY_CHUNK):
            piece = min(COPY_CHUNK, length - start)
            data = child.file.pread_exact(host + start, piece, "data")
            await parent.write(offset + start, data)
            done += piece
            if progress is not None:
                progress(done, total)
    return done


def _sync_folder(path: str) -> None:
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
