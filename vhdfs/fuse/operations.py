"""VhdfsOperations: FUSE requests translated into VirtualDisk calls.

The tree is tiny. With a directory mountpoint the root is a directory holding one
``<name>.raw`` file per image; with a regular-file mountpoint and one image the root inode is
the raw disk itself. Handlers resolve the inode or handle, call the disk and build the reply;
no image logic lives here.

Attributes of a raw file come from its image file (owner, times) and from every layer of its
chain (permission bits: only those all layers grant, so that a mount never shows a parent's
data more openly than the parent file does), with the write bits removed when the disk is
read-only, and ``default_permissions`` makes the kernel enforce them.

There are deliberately no extended attributes: while a file system answers ``getxattr`` at
all, the kernel asks it for ``security.capability`` before every single write (to clear
set-uid bits). Leaving ``getxattr`` unimplemented (ENOSYS) makes it stop asking, which
docs/performance.md shows is worth much of the random-write rate.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pyfuse3
from pyfuse3 import FileHandleT, FileNameT, InodeT

from vhdfs.disk.partitions import PartitionTable
from vhdfs.disk.virtual import VirtualDisk
from vhdfs.format.partition_table import Partition
from vhdfs.fuse.errno_map import fuse_errors, raise_fuse_error

#: The tree never changes, so the kernel may cache names and attributes for long.
_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Ownership:
    """What ``-o uid=,gid=,umask=`` asked the raw files and the root to show.

    They replace the image file's own owner, group and permission bits; ``None`` keeps them.
    """

    uid: int | None = None
    gid: int | None = None
    umask: int | None = None


_OWN = Ownership()


@dataclass(frozen=True, slots=True)
class RawFile:
    """One raw disk file of the mount; ``partitions`` when ``-o partitions`` shows them too.

    ``image`` gives owner and times; ``permissions`` the mode bits (the image's if ``None``).
    """

    name: str
    disk: VirtualDisk
    image: os.stat_result
    partitions: PartitionTable | None = None
    permissions: int | None = None

    @property
    def stem(self) -> str:
        """The name without ``.raw``: partition files are ``STEM.p1``, ``STEM.p2``..."""
        return self.name.removesuffix(".raw")


class _Window(NamedTuple):
    """An open partition file: a fixed window onto its disk, as the table said at open."""

    disk: VirtualDisk
    start: int
    size: int


#: Partition files have inodes from here: ``_PARTITION_INODES + index * 1024 + number``.
_PARTITION_INODES = 1 << 32
_PER_FILE = 1024
_PARTITION_NAME = re.compile(r"(.+)\.p([1-9][0-9]*)")


class VhdfsOperations(pyfuse3.Operations):
    """The FUSE file system of one mount.

    Args:
        files: The raw disk files, in directory order.
        single_file: Serve ``files[0]`` as the root inode (regular-file mountpoint).
        root_stat: Owner and times for the root directory.
        ownership: ``uid=``, ``gid=``, ``umask=`` of the mount.
    """

    enable_writeback_cache = False

    def __init__(
        self,
        files: Sequence[RawFile],
        *,
        single_file: bool,
        root_stat: os.stat_result,
        ownership: Ownership = _OWN,
    ) -> None:
        super().__init__()
        if single_file and len(files) != 1:
            raise ValueError("a single-file mount serves exactly one image")
        self.ownership = ownership
        self.single_file = single_file
        self.root_stat = root_stat
        first = pyfuse3.ROOT_INODE if single_file else pyfuse3.ROOT_INODE + 1
        self.files: dict[int, RawFile] = {first + i: f for i, f in enumerate(files)}
        self.names: dict[bytes, int] = {os.fsencode(f.name): i for i, f in self.files.items()}
        # Views of one disk through several files stay consistent only without the kernel's
        # page cache in between (a write through one would leave the others' pages stale).
        self.direct = any(f.partitions is not None for f in files)
        self._windows: dict[int, _Window] = {}
        self._next_handle = _PARTITION_INODES

    def _file(self, inode: int) -> RawFile:
        try:
            return self.files[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def _partition(self, inode: int) -> tuple[RawFile, Partition]:
        """The raw file and the current partition of a partition inode (ENOENT if gone)."""
        index, number = divmod(inode - _PARTITION_INODES, _PER_FILE)
        raw = self.files.get(index + (pyfuse3.ROOT_INODE + 1))
        if raw is None or raw.partitions is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        for partition in await raw.partitions.current():
            if partition.number == number:
                return raw, partition
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _partition_inode(self, raw_inode: int, number: int) -> int:
        return _PARTITION_INODES + (raw_inode - pyfuse3.ROOT_INODE - 1) * _PER_FILE + number

    # -- attributes ------------------------------------------------------------------------

    def _attributes(self, inode: int, size: int | None = None) -> pyfuse3.EntryAttributes:
        """Attributes of the root or a raw file, or (``size`` given) of a partition file."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = InodeT(inode)
        # The tree of raw files never changes; partition files follow their table.
        timeout = _TIMEOUT if size is None else 0.0
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        attr.st_blksize = 4096
        owner = self.ownership
        if inode == pyfuse3.ROOT_INODE and not self.single_file:
            source = self.root_stat
            mode = 0o755 if owner.umask is None else 0o777 & ~owner.umask
            attr.st_mode = stat.S_IFDIR | mode
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            raw = self._file(inode if size is None else self._raw_inode_of(inode))
            source = raw.image
            own = stat.S_IMODE(source.st_mode) if raw.permissions is None else raw.permissions
            mode = own if owner.umask is None else 0o666 & ~owner.umask
            mode &= 0o666
            if raw.disk.read_only:
                mode &= ~0o222
            attr.st_mode = stat.S_IFREG | mode
            attr.st_nlink = 1
            attr.st_size = raw.disk.size if size is None else size
            # From the image's allocation, so that du, cp --sparse and backup tools see a
            # sparse disk; a partition file is a window and counts as full. The kernel asks
            # again after every write (a write invalidates its cached block count).
            held = raw.disk.allocated_bytes() if size is None else size
            attr.st_blocks = -(-held // 512)
        attr.st_uid = source.st_uid if owner.uid is None else owner.uid
        attr.st_gid = source.st_gid if owner.gid is None else owner.gid
        attr.st_atime_ns = source.st_atime_ns
        attr.st_mtime_ns = source.st_mtime_ns
        attr.st_ctime_ns = source.st_ctime_ns
        return attr

    def _raw_inode_of(self, partition_inode: int) -> int:
        return (partition_inode - _PARTITION_INODES) // _PER_FILE + pyfuse3.ROOT_INODE + 1

    async def _any_attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode >= _PARTITION_INODES:
            _, partition = await self._partition(inode)
            return self._attributes(inode, partition.size)
        return self._attributes(inode)

    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Attributes of the root, a raw file or a partition file."""
        with fuse_errors("getattr"):
            return await self._any_attributes(inode)

    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Find a raw file or a partition file in the root directory."""
        with fuse_errors("lookup"):
            if parent_inode != pyfuse3.ROOT_INODE or self.single_file:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if name in (b".", b".."):
                return self._attributes(pyfuse3.ROOT_INODE)
            inode = self.names.get(name)
            if inode is not None:
                return self._attributes(inode)
            match = _PARTITION_NAME.fullmatch(os.fsdecode(name))
            raw_inode = self.names.get(os.fsencode(f"{match[1]}.raw")) if match else None
            if match is None or raw_inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self._any_attributes(self._partition_inode(raw_inode, int(match[2])))

    # -- directory -------------------------------------------------------------------------

    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        """Only the root is a directory."""
        if inode != pyfuse3.ROOT_INODE or self.single_file:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return FileHandleT(inode)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List the raw files, each followed by its partition files.

        ``start_id`` is the position to resume from.
        """
        with fuse_errors("readdir"):
            entries: list[tuple[str, pyfuse3.EntryAttributes]] = []
            for inode, raw in sorted(self.files.items()):
                entries.append((raw.name, self._attributes(inode)))
                for partition in await raw.partitions.current() if raw.partitions else []:
                    part_inode = self._partition_inode(inode, partition.number)
                    name = f"{raw.stem}.p{partition.number}"
                    entries.append((name, self._attributes(part_inode, partition.size)))
            for position, (name, attr) in enumerate(entries[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)), attr, position):
                    break

    async def releasedir(self, fh: FileHandleT) -> None:
        """Nothing to release."""

    # -- files -----------------------------------------------------------------------------

    async def open(
        self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        """Open a raw file (its inode is the handle) or a partition file (a new window)."""
        with fuse_errors("open"):
            writing = flags & os.O_ACCMODE != os.O_RDONLY
            if inode < _PARTITION_INODES:
                raw = self._file(inode)
                handle = inode
            else:
                raw, partition = await self._partition(inode)
                handle = self._next_handle = self._next_handle + 1
                self._windows[handle] = _Window(raw.disk, partition.start, partition.size)
            if writing and raw.disk.read_only:
                self._windows.pop(handle, None)
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(
                fh=FileHandleT(handle), keep_cache=not self.direct, direct_io=self.direct
            )

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        """Read from the virtual disk (or a window of it)."""
        try:
            raw = self.files.get(fh)
            if raw is not None:
                # Any contiguous buffer is a valid reply; the stub says bytes.
                return await raw.disk.read(off, size)  # type: ignore[return-value]
            window = self._window(fh)
            size = max(0, min(size, window.size - off))
            return await window.disk.read(window.start + off, size)  # type: ignore[return-value]
        except Exception as exc:
            raise_fuse_error("read", exc)

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        """Write to the virtual disk (acknowledged once held by the write-back layer)."""
        try:
            raw = self.files.get(fh)
            if raw is not None:
                return await raw.disk.write(off, buf)
            window = self._window(fh)
            if off >= window.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            view = memoryview(buf)[: window.size - off]
            return await window.disk.write(window.start + off, view)
        except Exception as exc:
            raise_fuse_error("write", exc)

    def _window(self, fh: int) -> _Window:
        try:
            return self._windows[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _disk(self, fh: int) -> VirtualDisk:
        raw = self.files.get(fh)
        return raw.disk if raw is not None else self._window(fh).disk

    async def flush(self, fh: FileHandleT) -> None:
        """Every close(): the disk's dirty data goes into the image before close returns."""
        with fuse_errors("flush"):
            await self._disk(fh).flush(durable=False)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        """fsync/fdatasync: dirty data into the image, and the image file synced."""
        with fuse_errors("fsync"):
            await self._disk(fh).flush(durable=True)

    async def release(self, fh: FileHandleT) -> None:
        """Last close of a handle; ``flush`` has already written its data."""
        self._windows.pop(fh, None)

    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Refuse changes of size, owner and mode; accept and ignore time stamp updates.

        A raw disk's size is fixed, as a block device's is (EPERM).
        """
        with fuse_errors("setattr"):
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            current = await self._any_attributes(inode)
            if fields.update_size and attr.st_size != current.st_size:
                raw = self.files.get(inode)
                read_only = raw is not None and raw.disk.read_only
                raise pyfuse3.FUSEError(errno.EROFS if read_only else errno.EPERM)
            return current

    # -- file system -----------------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Size of the disks; nothing is free in the directory itself."""
        data = pyfuse3.StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 512
        data.f_blocks = sum(f.disk.size for f in self.files.values()) // 512
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = len(self.files) + (0 if self.single_file else 1)
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data
