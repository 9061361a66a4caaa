"""A host file system that fills up: the write fails with ENOSPC, nothing is lost or broken,
retries do not grow the image, and everything goes in once there is room again."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import pattern, run
from vhdfs.disk.virtual import DiskOptions, open_disk
from vhdfs.errors import HostIOError
from vhdfs.image.check import check_chain
from vhdfs.image.create import create_dynamic

pytestmark = pytest.mark.root

MiB = 1 << 20


def _fill(fd: int) -> bool:
    """Write 64 KiB; False once the file system is full."""
    try:
        os.write(fd, bytes(64 << 10))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return False
    return True


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small"
    folder.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", folder])
    try:
        yield folder
    finally:
        run(["umount", folder])


async def test_full_host_file_system(small_fs: Path) -> None:
    image = small_fs / "d.vhd"
    create_dynamic(str(image), 64 * MiB, 1 * MiB)
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    while _fill(fd):
        pass
    os.close(fd)
    os.truncate(filler, filler.stat().st_size - 1 * MiB)  # room for about one block
    disk = open_disk(str(image), DiskOptions(writeback=60))
    data = pattern(3, 4 * MiB)
    await disk.write(0, data)
    sizes = []
    for _ in range(3):
        with pytest.raises(HostIOError) as caught:
            await disk.flush(durable=True)
        assert caught.value.errno == errno.ENOSPC
        sizes.append(image.stat().st_size)
        assert bytes(await disk.read(0, len(data))) == data  # still served from memory
    assert sizes[0] == sizes[1] == sizes[2]  # retries reuse the room they reserved
    filler.unlink()
    await disk.flush(durable=True)
    await disk.aclose()
    report = check_chain(str(image))
    assert report.exit_code == 0, [str(f) for f in report.findings]
    assert report.leaked_bytes == 0  # each block went where its first attempt reserved it
    check = open_disk(str(image), DiskOptions(read_only=True))
    try:
        assert bytes(await check.read(0, len(data))) == data
    finally:
        await check.aclose()
