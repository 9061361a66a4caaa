"""VhdfsOperations: FUSE requests translated into VirtualDisk calls.

The tree is tiny. With a directory mountpoint the root is a directory holding one
``<name>.raw`` file per image; with a regular-file mountpoint and one image the root inode is
the raw disk itself. Handlers resolve the inode or handle, call the disk and build the reply;
no image logic lives here.

Attributes of a raw file come from its image file (owner, permission bits, times), with the
write bits removed when the disk is read-only, and ``default_permissions`` makes the kernel
enforce them.

There are deliberately no extended attributes: while a file system answers ``getxattr`` at
all, the kernel asks it for ``security.capability`` before every single write (to clear
set-uid bits). Leaving ``getxattr`` unimplemented (ENOSYS) makes it stop asking, which
docs/performance.md shows is worth much of the random-write rate.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import FileHandleT, FileNameT, InodeT

from vhdfs.disk.virtual import VirtualDisk
from vhdfs.fuse.errno_map import fuse_errors

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


@dataclass(frozen=True, slots=True)
class RawFile:
    """One raw disk file of the mount."""

    name: str
    disk: VirtualDisk
    image: os.stat_result


class VhdfsOperations(pyfuse3.Operations):
    """The FUSE file system of one mount.

    Args:
        files: The raw disk files, in directory order.
        single_file: Serve ``files[0]`` as the root inode (regular-file mountpoint).
        root_stat: Owner and times for the root directory.
    """

    enable_writeback_cache = False

    def __init__(
        self,
        files: Sequence[RawFile],
        *,
        single_file: bool,
        root_stat: os.stat_result,
        ownership: Ownership = Ownership(),
    ) -> None:
        super().__init__()
        self.ownership = ownership
        if single_file and len(files) != 1:
            raise ValueError("a single-file mount serves exactly one image")
        self.single_file = single_file
        self.root_stat = root_stat
        first = pyfuse3.ROOT_INODE if single_file else pyfuse3.ROOT_INODE + 1
        self.files: dict[int, RawFile] = {first + i: f for i, f in enumerate(files)}
        self.names: dict[bytes, int] = {os.fsencode(f.name): i for i, f in self.files.items()}

    def _file(self, inode: int) -> RawFile:
        try:
            return self.files[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    # -- attributes ------------------------------------------------------------------------

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = InodeT(inode)
        attr.entry_timeout = _TIMEOUT
        attr.attr_timeout = _TIMEOUT
        attr.st_blksize = 4096
        owner = self.ownership
        if inode == pyfuse3.ROOT_INODE and not self.single_file:
            source = self.root_stat
            mode = 0o755 if owner.umask is None else 0o777 & ~owner.umask
            attr.st_mode = stat.S_IFDIR | mode
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            raw = self._file(inode)
            source = raw.image
            mode = stat.S_IMODE(source.st_mode) if owner.umask is None else 0o666 & ~owner.umask
            mode &= 0o666
            if raw.disk.read_only:
                mode &= ~0o222
            attr.st_mode = stat.S_IFREG | mode
            attr.st_nlink = 1
            attr.st_size = raw.disk.size
            attr.st_blocks = raw.disk.size // 512
        attr.st_uid = source.st_uid if owner.uid is None else owner.uid
        attr.st_gid = source.st_gid if owner.gid is None else owner.gid
        attr.st_atime_ns = source.st_atime_ns
        attr.st_mtime_ns = source.st_mtime_ns
        attr.st_ctime_ns = source.st_ctime_ns
        return attr

    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Attributes of the root or of a raw file."""
        with fuse_errors("getattr"):
            return self._attributes(inode)

    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Find a raw file in the root directory."""
        with fuse_errors("lookup"):
            if parent_inode != pyfuse3.ROOT_INODE or self.single_file:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if name in (b".", b".."):
                return self._attributes(pyfuse3.ROOT_INODE)
            inode = self.names.get(name)
            if inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attributes(inode)

    # -- directory -------------------------------------------------------------------------

    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        """Only the root is a directory."""
        if inode != pyfuse3.ROOT_INODE or self.single_file:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return FileHandleT(inode)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List the raw files; ``start_id`` is the position to resume from."""
        with fuse_errors("readdir"):
            entries = sorted(self.files.items())
            for position, (inode, raw) in enumerate(entries[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(
                    token, FileNameT(os.fsencode(raw.name)), self._attributes(inode), position
                ):
                    break

    async def releasedir(self, fh: FileHandleT) -> None:
        """Nothing to release."""

    # -- files -----------------------------------------------------------------------------

    async def open(
        self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        """Open a raw file; the inode doubles as the file handle."""
        with fuse_errors("open"):
            raw = self._file(inode)
            if flags & os.O_ACCMODE != os.O_RDONLY and raw.disk.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=FileHandleT(inode), keep_cache=True)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        """Read from the virtual disk."""
        with fuse_errors("read"):
            # Any contiguous buffer is a valid reply; the stub says bytes.
            return await self._file(fh).disk.read(off, size)  # type: ignore[return-value]

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        """Write to the virtual disk (acknowledged once held by the write-back layer)."""
        with fuse_errors("write"):
            return await self._file(fh).disk.write(off, buf)

    async def flush(self, fh: FileHandleT) -> None:
        """Every close(): the disk's dirty data goes into the image before close returns."""
        with fuse_errors("flush"):
            await self._file(fh).disk.flush(durable=False)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        """fsync/fdatasync: dirty data into the image, and the image file synced."""
        with fuse_errors("fsync"):
            await self._file(fh).disk.flush(durable=True)

    async def release(self, fh: FileHandleT) -> None:
        """Last close of a handle; ``flush`` has already written its data."""

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
            if fields.update_size:
                raw = self.files.get(inode)
                if raw is None or attr.st_size != raw.disk.size:
                    read_only = raw is not None and raw.disk.read_only
                    raise pyfuse3.FUSEError(errno.EROFS if read_only else errno.EPERM)
            return self._attributes(inode)

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
