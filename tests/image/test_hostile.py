"""Real images that must open, and hostile ones that must be refused quickly, in one line.

Each class here was seen failing: a child carrying its parent's unique id (MiniVHD), a BAT
that covers less than the disk, a size no file can have, a BAT that claims more blocks than the
file can hold (a table left a hole reads as entries of 0, not unallocated), parents that are
FIFOs, devices, sockets or directories, and locator text that is not a printable path.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import struct
import subprocess
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.craft import Item, Parent, craft, craft_sparse, unique_id_of
from tests.support.mounting import is_mounted, vhd_command, vhdfs_command
from tests.support.vhdwrite import rewrite_footers, rewrite_header
from vhdfs.errors import (
    CorruptMetadataError,
    FormatError,
    ImageAccessError,
    ParentNotFoundError,
)
from vhdfs.image import regions
from vhdfs.image.chain import Chain
from vhdfs.image.check import check_chain
from vhdfs.image.create import create_differencing, create_dynamic
from vhdfs.image.vhd import VhdImage

BLOCK = 64 << 10
SIZE = 4 * BLOCK
LAYOUT: list[Item] = ["header", "bat", "locators", ("block", 1)]


def _child(tmp_path: Path, locators: list[tuple[bytes, bytes]], name: str = "base.vhd") -> Path:
    """A crafted child of ``tmp_path/base.vhd`` recording ``locators`` and ``name``."""
    base = tmp_path / "base.vhd"
    if not base.exists():
        create_dynamic(str(base), SIZE, BLOCK)
    child = tmp_path / "child.vhd"
    parent = Parent(unique_id_of(base), name, locators)
    craft(
        child,
        size=SIZE,
        block_size=BLOCK,
        layout=LAYOUT,
        data={1: bytes(range(256)) * (BLOCK // 256)},
        parent=parent,
    )
    return child


def _run(command: list[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=30)


# -- real images that must open -----------------------------------------------------------


def test_child_with_its_parents_unique_id_opens(tmp_path: Path) -> None:
    # MiniVHD seeds ids with the clock: a child made in the same second shares the id.
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    create_dynamic(str(base), SIZE, BLOCK)
    create_differencing(str(child), str(base), BLOCK)
    rewrite_footers(child, {68: unique_id_of(base)})
    chain = Chain.open(str(child))
    try:
        assert [layer.path for layer in chain.layers] == [str(child), str(base)]
        assert chain.leaf.footer.unique_id == chain.layers[1].footer.unique_id
    finally:
        chain.close()


def test_child_naming_itself_is_still_a_loop(tmp_path: Path) -> None:
    child = _child(tmp_path, [(b"W2ru", ".\\child.vhd".encode("utf-16-le"))])
    rewrite_header(child, {40: unique_id_of(child)})
    with pytest.raises(Exception, match="which is already in the chain") as caught:
        Chain.open(str(child))
    assert caught.value.__class__.__name__ == "ChainLoopError"


# -- sizes no BAT or file can hold ----------------------------------------------------------


def test_bat_covering_less_than_the_disk_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), SIZE, BLOCK)
    rewrite_footers(image, {48: struct.pack(">Q", SIZE + BLOCK)})  # one block beyond the BAT
    with pytest.raises(CorruptMetadataError) as caught:
        Chain.open(str(image))
    assert str(caught.value) == (
        f"{image}: dynamic header max table entries 4 cover {SIZE} bytes, less than the "
        f"footer current size {SIZE + BLOCK}"
    )


def test_size_of_2_to_the_63_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 2 * BLOCK, BLOCK)
    rewrite_footers(image, {48: struct.pack(">Q", 1 << 63)})
    with pytest.raises(FormatError) as caught:
        Chain.open(str(image))
    assert str(caught.value) == (
        f"{image}: footer current size {1 << 63} is beyond the largest file size Linux can "
        f"serve ({(1 << 63) - 1} bytes)"
    )


def test_largest_size_a_bat_cannot_cover_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 2 * BLOCK, BLOCK)
    rewrite_footers(image, {48: struct.pack(">Q", (1 << 63) - 512)})
    with pytest.raises(CorruptMetadataError, match="max table entries 2 cover 131072 bytes"):
        Chain.open(str(image))


# -- tables that claim more blocks than the file holds ----------------------------------------

#: Sizes claimed with 512-byte blocks: 64 GiB (a BAT of 512 MiB), and the most entries a header
#: can give, 2^32 - 1 (2 TiB, a BAT of 16 GiB). Either table is left a hole: every entry is 0.
HOLE_SIZES = {"64GiB": 64 << 30, "2TiB": (2**32 - 1) * 512}
#: Address space the commands get: a small fraction of what such a table would take kept.
COMMAND_MEMORY = 512 << 20


def _hole_image(tmp_path: Path, name: str) -> tuple[Path, str]:
    """An image claiming ``HOLE_SIZES[name]`` with a BAT of zeros, and the error it must get."""
    image = tmp_path / "hole.vhd"
    craft_sparse(image, size=HOLE_SIZES[name], block_size=512)
    message = (
        f"{image}: BAT entry 0 = sector 0: block at 0..1024 overlaps the footer copy at 0..512"
    )
    return image, message


@contextlib.contextmanager
def _address_space_to_spare(extra: int) -> Iterator[None]:
    """Let this process map at most ``extra`` more bytes for a while.

    A regression then fails the test with a MemoryError instead of taking the machine's memory.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (COMMAND_MEMORY, COMMAND_MEMORY))


def _run_limited(command: list[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )


@pytest.mark.parametrize("name", HOLE_SIZES)
def test_bat_left_a_hole_is_refused_at_its_first_entry(name: str, tmp_path: Path) -> None:
    image, message = _hole_image(tmp_path, name)
    with pytest.raises(CorruptMetadataError) as caught, _address_space_to_spare(256 << 20):
        Chain.open(str(image))
    assert str(caught.value) == message
    with _address_space_to_spare(256 << 20):
        report = check_chain(str(image))
    assert (report.exit_code, [str(f) for f in report.findings]) == (1, [f"error: {message}"])


@pytest.mark.parametrize("name", HOLE_SIZES)
def test_commands_refuse_a_bat_left_a_hole_in_bounded_memory(name: str, tmp_path: Path) -> None:
    image, message = _hole_image(tmp_path, name)
    result = _run_limited(vhd_command(), "check", image)
    assert (result.returncode, result.stdout, result.stderr) == (1, f"error: {message}\n", "")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _run_limited(vhdfs_command(), image, mountpoint)
    assert (result.returncode, result.stdout, result.stderr) == (3, "", f"vhdfs: {message}\n")
    assert not is_mounted(str(mountpoint))


def test_more_allocated_entries_than_the_file_holds_are_refused_when_counted(
    tmp_path: Path,
) -> None:
    # Room for two blocks, named over and over, out of order: no entry overlaps the one
    # before it, but the third is one block more than the file can hold.
    image = tmp_path / "d.vhd"
    size = 1024 * 512
    first = craft_sparse(image, size=size, block_size=512, data_bytes=2 * 1024)
    craft_sparse(
        image, size=size, block_size=512, data_bytes=2 * 1024, table=[first, first + 2] * 512
    )
    data_end = first * 512 + 2 * 1024
    with pytest.raises(CorruptMetadataError) as caught:
        VhdImage.open(str(image))
    assert str(caught.value) == (
        f"{image}: BAT entry 2 = sector {first} is allocated block 3, but {data_end} bytes of "
        "data hold at most 2 blocks of 1024 bytes beside the metadata: blocks overlap"
    )


def test_a_bat_repeating_itself_is_refused_before_it_is_all_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A table whose pages repeat costs little on a file system that shares extents: the
    # repeat is found when the starts kept first reach the interim check.
    monkeypatch.setattr(regions, "FIRST_INTERIM_CHECK", 8)
    monkeypatch.setattr(regions, "SORT_CHUNK", 4)
    blocks = regions.BlockStarts(2)
    page = array("I", [10, 20, 30, 40])
    assert blocks.add(page) is None
    assert blocks.add(page) == (10, 10)
    assert len(blocks) == 8


#: More blocks than the sort of out-of-order starts takes at a time (``regions.SORT_CHUNK``).
MANY = 150_000


def _many_blocks(tmp_path: Path, order: str) -> tuple[Path, int, list[int]]:
    """An image of ``MANY`` 512-byte blocks filling its data area, listed in ``order``."""
    image = tmp_path / "d.vhd"
    size = MANY * 512
    first = craft_sparse(image, size=size, block_size=512, data_bytes=MANY * 1024)
    starts = [first + 2 * block for block in range(MANY)]
    if order == "reversed":
        starts.reverse()
    else:
        random.Random(5).shuffle(starts)
    return image, first, starts


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_many_blocks_out_of_order_open_and_check_clean(order: str, tmp_path: Path) -> None:
    image, first, starts = _many_blocks(tmp_path, order)
    craft_sparse(image, size=MANY * 512, block_size=512, data_bytes=MANY * 1024, table=starts)
    opened = VhdImage.open(str(image))
    try:
        assert (opened.allocated_blocks, opened.data_end) == (MANY, (first + 2 * MANY) * 512)
    finally:
        opened.close()
    report = check_chain(str(image))
    assert (report.exit_code, report.findings, report.leaked_bytes) == (0, [], 0)


def test_two_entries_for_one_block_far_apart_in_a_shuffled_bat(tmp_path: Path) -> None:
    image, _, starts = _many_blocks(tmp_path, "shuffled")
    twin = starts[10]
    starts[-1] = twin  # one block fewer than the file holds: only the sort can tell
    craft_sparse(image, size=MANY * 512, block_size=512, data_bytes=MANY * 1024, table=starts)
    with pytest.raises(CorruptMetadataError) as caught:
        VhdImage.open(str(image))
    assert str(caught.value) == (
        f"{image}: BAT entries at sectors {twin} and {twin} overlap (a block spans 2 sectors)"
    )


# -- parents that are not files --------------------------------------------------------------


def _special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:
        os.symlink("/dev/zero", path)  # a character device, reached through a symlink


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "chardev"])
def test_parent_that_is_not_a_file_is_refused_unopened(kind: str, tmp_path: Path) -> None:
    child = _child(tmp_path, [(b"W2ru", ".\\odd".encode("utf-16-le"))])
    _special(kind, tmp_path / "odd")
    (tmp_path / "base.vhd").unlink()
    # A FIFO would block the open forever: the command must answer at once.
    result = _run(vhd_command(), "info", child)
    assert result.returncode == 4, result.stderr
    what = {"fifo": "a FIFO", "directory": "a directory", "socket": "a socket"}
    described = what.get(kind, "a character device")
    assert result.stdout.splitlines()[-1] == (
        f"chain incomplete: {child}: parent 'base.vhd' not found; tried: {tmp_path / 'odd'} "
        f"({described}, not a regular file or block device; not opened), "
        f"{tmp_path / 'base.vhd'}"
    )


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_image_that_is_not_a_file_is_refused_unopened(kind: str, tmp_path: Path) -> None:
    odd = tmp_path / "odd.vhd"
    _special(kind, odd)
    with pytest.raises(ImageAccessError, match="not a regular file or block device; not opened"):
        Chain.open(str(odd))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _run(vhdfs_command(), odd, mountpoint)
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1
    assert not is_mounted(str(mountpoint))


# -- what an image says is data, not text to print -------------------------------------------


def test_nul_in_a_macx_locator_is_not_a_crash(tmp_path: Path) -> None:
    child = _child(tmp_path, [(b"MacX", b"file:///tmp/x%00y.vhd")], name="gone.vhd")
    with pytest.raises(ParentNotFoundError) as caught:
        Chain.open(str(child))
    assert str(caught.value) == (
        f"{child}: parent 'gone.vhd' not found; tried: /tmp/x\\x00y.vhd, {tmp_path / 'gone.vhd'}"
    )


HOSTILE_TEXT = "evil\x1b[2J\nerror: forged.vhd: fine\x07.vhd"


def test_locator_text_is_escaped_in_every_command(tmp_path: Path) -> None:
    child = _child(tmp_path, [(b"W2ru", HOSTILE_TEXT.encode("utf-16-le"))], name=HOSTILE_TEXT)
    (tmp_path / "base.vhd").unlink()
    escaped = "evil\\x1b[2J\\nerror: forged.vhd: fine\\x07.vhd"
    message = f"{child}: parent {HOSTILE_TEXT!r} not found; tried: {tmp_path / escaped}"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _run(vhdfs_command(), child, mountpoint)
    assert (result.returncode, result.stderr) == (4, f"vhdfs: {message}\n")
    result = _run(vhd_command(), "check", child)
    assert (result.returncode, result.stdout) == (1, f"error: {message}\n")
    result = _run(vhd_command(), "info", child)
    assert result.returncode == 4
    assert result.stdout.splitlines()[-1] == f"chain incomplete: {message}"
    assert "\x1b" not in result.stdout
    assert "\x07" not in result.stdout


def test_warnings_do_not_precede_the_error_line(tmp_path: Path) -> None:
    # A locator past the end of the file is a warning; the missing parent is the error.
    child = _child(tmp_path, [(b"W2ru", ".\\base.vhd".encode("utf-16-le"))])
    with open(child, "r+b") as f:
        header = bytearray(f.read(1536))[512:]
    offset = struct.unpack_from(">Q", header, 576 + 16)[0]
    rewrite_header(child, {576 + 16: struct.pack(">Q", offset + (1 << 30))})
    (tmp_path / "base.vhd").unlink()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _run(vhdfs_command(), child, mountpoint)
    assert result.returncode == 4
    [line] = result.stderr.splitlines()
    assert line == f"vhdfs: {child}: parent 'base.vhd' not found; tried: {tmp_path / 'base.vhd'}"
    findings = [str(f) for f in check_chain(str(child)).findings]
    assert findings == [
        f"warning: {child}: parent locator 0 (W2ru) data at offset {offset + (1 << 30)} runs "
        "past the end of the file; ignored, and the image is not written",
        f"error: {child}: parent 'base.vhd' not found; tried: {tmp_path / 'base.vhd'}",
    ]
