"""Damaged and hostile images: each is refused with the exact message, and never modified."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.files import tree_hashes
from tests.support.images import Layer, build_chain
from tests.support.vhdwrite import corrupt_footer_checksum, rewrite_footers, rewrite_header
from vhdfs.errors import (
    ChainLoopError,
    ChecksumError,
    CorruptMetadataError,
    FormatError,
    NotAVhdError,
    OtherFormatError,
    ParentIdMismatchError,
    ParentNotFoundError,
    TruncatedImageError,
    UnsupportedImageError,
    VhdfsError,
)
from vhdfs.image.chain import Chain
from vhdfs.image.create import create_differencing, create_dynamic, create_fixed

MiB = 1 << 20


def _refused(path: Path, error: type[VhdfsError], where: Path | None = None) -> str:
    """Open ``path``; assert it fails with ``error`` about ``where`` (default: ``path``) and
    leaves every file untouched. Return the message without the file name."""
    where = where or path
    before = tree_hashes(path.parent)
    with pytest.raises(error) as caught:
        Chain.open(str(path)).close()
    assert tree_hashes(path.parent) == before
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{where}: ")
    return message[len(f"{where}: ") :]


def _dynamic_with_data(tmp_path: Path) -> Path:
    built = build_chain(tmp_path, 6 * MiB, [Layer(writes=[(0, 8), (4096, 8), (8192, 8)])])
    return built.leaf


def _bat_entry_offset(path: Path, block: int) -> int:
    with open(path, "rb") as f:
        f.seek(512 + 16)
        table = struct.unpack(">Q", f.read(8))[0]
    return table + 4 * block


def _set_bat_entry(path: Path, block: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(_bat_entry_offset(path, block))
        f.write(struct.pack(">I", value))


def test_not_a_vhd(tmp_path: Path) -> None:
    path = tmp_path / "random.vhd"
    path.write_bytes(os.urandom(8192))
    assert _refused(path, NotAVhdError) == "not a VHD image: no 'conectix' cookie in the footer"


def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.vhd"
    path.write_bytes(b"conectix")
    assert _refused(path, NotAVhdError) == "not a VHD image: the file is only 8 bytes"


@pytest.mark.parametrize(
    ("head", "name", "fmt"),
    [
        (b"vhdxfile", "VHDX", "vhdx"),
        (b"QFI\xfb\0\0\0\3", "qcow2", "qcow2"),
        (b"KDMV\1\0\0\0", "VMDK", "vmdk"),
        (b"# Disk DescriptorFile\nversion=1\n", "VMDK descriptor", "vmdk"),
        (
            b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0") + b"\x7f\x10\xda\xbe",
            "VDI (VirtualBox)",
            "vdi",
        ),
    ],
)
def test_other_formats_are_named(tmp_path: Path, head: bytes, name: str, fmt: str) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(head + bytes(1 << 16))
    assert _refused(path, OtherFormatError) == (
        f"this is a {name} image, not a VHD; make a VHD of it with: qemu-img convert -f {fmt} "
        f"-O vpc -o subformat=dynamic,force_size=on {path} disk.vhd"
    )


def test_fixed_footer_checksum(tmp_path: Path) -> None:
    path = tmp_path / "fixed.vhd"
    create_fixed(str(path), MiB)
    corrupt_footer_checksum(path)
    message = _refused(path, ChecksumError)
    assert message.startswith("footer checksum 0x")
    assert "does not match computed 0x" in message


def test_dynamic_footer_damaged_uses_copy(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    corrupt_footer_checksum(path)
    before = tree_hashes(tmp_path)
    chain = Chain.open(str(path))
    chain.close()
    assert tree_hashes(tmp_path) == before
    [warning] = chain.leaf.warnings
    assert warning.code == "trailing-footer-unusable"
    assert warning.message.startswith("trailing footer unusable (footer checksum 0x")
    assert warning.message.endswith("); using the copy at offset 0")


def test_header_checksum(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    with open(path, "r+b") as f:
        f.seek(512 + 36)
        f.write(b"\0\0\0\0")
    assert _refused(path, ChecksumError).startswith("dynamic header checksum 0x00000000")


def test_block_size_not_power_of_two(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    rewrite_header(path, {32: struct.pack(">I", 3000)})
    assert _refused(path, FormatError) == (
        "dynamic header block size 3000 is not a power of two of at least 512"
    )


def test_unknown_disk_type(tmp_path: Path) -> None:
    path = tmp_path / "fixed.vhd"
    create_fixed(str(path), MiB)
    rewrite_footers(path, {60: struct.pack(">I", 5)})
    assert _refused(path, FormatError) == (
        "footer disk type 5 is not 2 (fixed), 3 (dynamic) or 4 (differencing)"
    )


def test_huge_table_is_not_allocated(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    rewrite_header(path, {28: struct.pack(">I", 0xFFFFFFFF)})
    message = _refused(path, TruncatedImageError)
    assert message.startswith("BAT of 4294967295 entries at offset 1536 needs 17179869180 bytes")


def test_truncated_dynamic(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    size = path.stat().st_size
    os.truncate(path, size - 512 - 100_000)
    message = _refused(path, TruncatedImageError)
    assert message.startswith("file is truncated: block 2 at offset ")
    assert message.endswith("its trailing footer is missing")


def test_truncated_fixed(tmp_path: Path) -> None:
    path = tmp_path / "fixed.vhd"
    create_fixed(str(path), MiB)
    footer = path.read_bytes()[-512:]
    os.truncate(path, MiB // 2)
    with open(path, "ab") as f:
        f.write(footer)
    assert _refused(path, TruncatedImageError) == (
        f"fixed disk: footer current size {MiB} needs that many bytes of data before the "
        f"footer, but the file holds {MiB // 2}"
    )


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    _set_bat_entry(path, 2, 0x100000)
    size = path.stat().st_size
    assert _refused(path, CorruptMetadataError) == (
        f"BAT entry 2 = sector {0x100000}: block at offset {0x100000 * 512} ends at "
        f"{0x100000 * 512 + 512 + 2 * MiB}, beyond the end of data at {size - 512}"
    )


def test_bat_entry_inside_metadata(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    _set_bat_entry(path, 1, 1)
    assert _refused(path, CorruptMetadataError) == (
        f"BAT entry 1 = sector 1: block at 512..{512 + 512 + 2 * MiB} overlaps the dynamic "
        "header at 512..1536"
    )


def test_overlapping_blocks(tmp_path: Path) -> None:
    path = _dynamic_with_data(tmp_path)
    with open(path, "rb") as f:
        f.seek(_bat_entry_offset(path, 0))
        first = struct.unpack(">I", f.read(4))[0]
    _set_bat_entry(path, 1, first + 8)
    assert _refused(path, CorruptMetadataError) == (
        f"BAT entries at sectors {first} and {first + 8} overlap (a block spans 4097 sectors)"
    )


def _chain_of_two(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    create_dynamic(str(base), 4 * MiB)
    create_differencing(str(child), str(base))
    return base, child


def test_missing_parent_lists_every_path(tmp_path: Path) -> None:
    base, child = _chain_of_two(tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(base, moved / "base.vhd")
    message = _refused(child, ParentNotFoundError)
    assert message == f"parent 'base.vhd' not found; tried: {base}"


def test_missing_parent_in_other_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = tmp_path / "a" / "base.vhd"
    child = tmp_path / "b" / "child.vhd"
    create_dynamic(str(base), 4 * MiB)
    create_differencing(str(child), str(base))
    base.unlink()
    # W2ru (relative), then W2ku/MacX (absolute, the same path), then the name beside the child.
    assert _refused(child, ParentNotFoundError) == (
        f"parent 'base.vhd' not found; tried: {base}, {tmp_path / 'b' / 'base.vhd'}"
    )


def test_parent_id_mismatch(tmp_path: Path) -> None:
    base, child = _chain_of_two(tmp_path)
    base.unlink()
    create_dynamic(str(base), 4 * MiB)
    message = _refused(child, ParentIdMismatchError)
    assert message == (
        f"parent 'base.vhd' not found: {base} is a VHD, but its unique id is not the one "
        "this image records"
    )


def test_chain_loop(tmp_path: Path) -> None:
    # Replace base by a child of child, and point child at it: child -> base -> child.
    base, child = _chain_of_two(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    create_differencing(str(other / "base.vhd"), str(child))
    shutil.move(other / "base.vhd", base)
    with open(base, "rb") as f:
        f.seek(-512 + 68, os.SEEK_END)
        base_id = f.read(16)
    rewrite_header(child, {40: base_id})
    message = _refused(child, ChainLoopError, where=base)
    # base's relative locator names ../child.vhd (it was made in other/); its MacX locator
    # holds the absolute path, which is the child: a file met twice.
    assert message == f"MacX locator (slot 2) points at {child}, which is already in the chain"


@pytest.mark.parametrize(
    ("edit", "error", "expected"),
    [
        (lambda p: rewrite_footers(p, {0: b"v_poison"}), UnsupportedImageError, "v_poison"),
        (
            lambda p: rewrite_footers(p, {12: struct.pack(">I", 0x20000)}),
            FormatError,
            "footer format version 0x00020000 is not 0x00010000 (VHD 1.0)",
        ),
    ],
)
def test_footer_fields(
    tmp_path: Path, edit: Callable[[Path], None], error: type[VhdfsError], expected: str
) -> None:
    path = tmp_path / "fixed.vhd"
    create_fixed(str(path), MiB)
    edit(path)
    assert expected in _refused(path, error)
