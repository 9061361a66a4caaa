"""VhdfsOperations called directly (no kernel): replies and errno mapping."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import pytest

from tests.support.images import Layer, build_chain
from vhdfs.disk.virtual import DiskOptions, open_disk
from vhdfs.errors import HostIOError
from vhdfs.fuse.operations import RawFile, VhdfsOperations

SIZE = 4 << 20


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[tuple[VhdfsOperations, bytes]]:
    built = build_chain(tmp_path, SIZE, [Layer(writes=[(8, 100)])])
    disk = open_disk(str(built.leaf), DiskOptions(read_only=True))
    raw = RawFile("layer0.raw", disk, os.stat(built.leaf))
    yield (
        VhdfsOperations([raw], single_file=False, root_stat=os.stat(tmp_path)),
        bytes(built.expected),
    )
    await disk.aclose()


CTX = None  # the handlers never look at the request context


async def test_tree_and_attributes(ops: tuple[VhdfsOperations, bytes]) -> None:
    fs, _ = ops
    root = await fs.getattr(pyfuse3.ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode)
    attr = await fs.lookup(pyfuse3.ROOT_INODE, b"layer0.raw", CTX)
    assert stat.S_ISREG(attr.st_mode)
    assert attr.st_size == SIZE
    assert attr.st_mode & 0o222 == 0  # read-only disk: no write bits
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.lookup(pyfuse3.ROOT_INODE, b"other.raw", CTX)
    assert caught.value.errno == errno.ENOENT
    data = await fs.statfs(CTX)
    assert data.f_blocks == SIZE // 512


async def test_read_and_refused_writes(ops: tuple[VhdfsOperations, bytes]) -> None:
    fs, expected = ops
    attr = await fs.lookup(pyfuse3.ROOT_INODE, b"layer0.raw", CTX)
    info = await fs.open(attr.st_ino, os.O_RDONLY, CTX)
    assert bytes(await fs.read(info.fh, 4000, 10000)) == expected[4000:14000]
    assert bytes(await fs.read(info.fh, SIZE - 10, 100)) == expected[-10:]
    assert bytes(await fs.read(info.fh, SIZE + 10, 100)) == b""
    for call in (fs.open(attr.st_ino, os.O_RDWR, CTX), fs.write(info.fh, 0, b"x")):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await call
        assert caught.value.errno == errno.EROFS
    await fs.flush(info.fh)
    await fs.fsync(info.fh, True)
    await fs.release(info.fh)


async def test_no_extended_attributes(ops: tuple[VhdfsOperations, bytes]) -> None:
    # ENOSYS, so the kernel stops asking for security.capability before every write.
    fs, _ = ops
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.getxattr(pyfuse3.ROOT_INODE, b"security.capability", CTX)
    assert caught.value.errno == errno.ENOSYS


async def test_errors_become_errno(ops: tuple[VhdfsOperations, bytes]) -> None:
    fs, _ = ops
    attr = await fs.lookup(pyfuse3.ROOT_INODE, b"layer0.raw", CTX)
    disk = fs.files[attr.st_ino].disk

    async def failing_io(offset: int, length: int) -> bytes:
        raise HostIOError("x.vhd", "read failed: Input/output error")

    async def buggy(offset: int, length: int) -> bytes:
        raise ZeroDivisionError

    for replacement in (failing_io, buggy):
        disk.read = replacement  # type: ignore[method-assign]
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await fs.read(attr.st_ino, 0, 10)
        assert caught.value.errno == errno.EIO
