"""Real images that must open, and hostile ones that must be refused quickly, in one line.

Each class here was seen failing: a child carrying its parent's unique id (MiniVHD), a BAT
that covers less than the disk, a size no file can have, parents that are FIFOs, devices,
sockets or directories, and locator text that is not a printable path.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.support.craft import Item, Parent, craft, unique_id_of
from tests.support.mounting import is_mounted, vhd_command, vhdfs_command
from tests.support.vhdwrite import rewrite_footers, rewrite_header
from vhdfs.errors import (
    CorruptMetadataError,
    FormatError,
    ImageAccessError,
    ParentNotFoundError,
)
from vhdfs.image.chain import Chain
from vhdfs.image.check import check_chain
from vhdfs.image.create import create_differencing, create_dynamic

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
