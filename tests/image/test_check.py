"""vhd check: clean images, leaked space (however small the blocks), damage, unreadable files."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain
from tests.support.vhdwrite import corrupt_footer_checksum, rewrite_footers, rewrite_header
from vhdfs.errors import CorruptMetadataError
from vhdfs.image.check import check_chain
from vhdfs.image.create import create_differencing, create_dynamic
from vhdfs.image.hostfile import HostFile
from vhdfs.image.vhd import VhdImage

MiB = 1 << 20


def _findings(path: Path) -> list[str]:
    return [str(f) for f in check_chain(str(path)).findings]


def test_clean_chain(tmp_path: Path) -> None:
    built = build_chain(tmp_path, 4 * MiB, [Layer(writes=[(0, 100)]), Layer(writes=[(7, 9)])])
    report = check_chain(str(built.leaf))
    assert (report.exit_code, report.findings, report.leaked_bytes) == (0, [], 0)
    assert report.layers == [str(p) for p in built.paths]


def _leak_a_block(path: Path, span: int) -> tuple[int, int]:
    """What an allocation interrupted before its BAT write leaves: a block-sized region and
    the footer moved behind it. Returns the leaked range."""
    size = path.stat().st_size
    footer = path.read_bytes()[-512:]
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(bytes(span) + footer)
    return size - 512, size - 512 + span


@pytest.mark.parametrize("block_size", [512, 4096, 2 * MiB])
def test_interrupted_allocation_is_a_leak(tmp_path: Path, block_size: int) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), MiB, block_size)
    start, end = _leak_a_block(image, block_size + 512)
    report = check_chain(str(image))
    assert report.exit_code == 0
    assert _findings(image) == [
        f"leak: {image}: {end - start} bytes at offset {start} are unreferenced"
    ]
    assert report.leaked_bytes == end - start


def test_damage_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), MiB)
    with open(image, "r+b") as f:
        f.seek(512 + 36)
        f.write(b"\0\0\0\0")
    report = check_chain(str(image))
    assert report.exit_code == 1
    assert _findings(image)[0].startswith(f"error: {image}: dynamic header checksum 0x00000000")


def test_footer_copies_that_disagree(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), MiB)
    corrupt_footer_checksum(image)
    warning, error = _findings(image)
    assert warning.startswith(f"warning: {image}: trailing footer unusable (footer checksum 0x")
    assert warning.endswith("); using the copy at offset 0")
    assert error == (
        f"error: {image}: the trailing footer is missing or damaged; only the copy at offset 0 "
        "is valid"
    )
    assert check_chain(str(image)).exit_code == 1


def test_saved_state_is_a_warning(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), MiB)
    rewrite_footers(image, {84: b"\x01"})
    report = check_chain(str(image))
    assert report.exit_code == 0
    assert [f.severity for f in report.findings] == ["warning"]


def test_missing_parent_is_an_error(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_dynamic(str(base), MiB)
    create_differencing(str(child), str(base))
    base.unlink()
    report = check_chain(str(child))
    assert report.exit_code == 1
    assert _findings(child) == [f"error: {child}: parent 'base.vhd' not found; tried: {base}"]


def test_unreadable_or_busy_images(tmp_path: Path) -> None:
    missing = tmp_path / "missing.vhd"
    assert check_chain(str(missing)).exit_code == 2
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), MiB)
    writer = HostFile.open(str(image), writable=True)
    try:
        writer.lock(exclusive=True)  # what a read-write mount holds
        report = check_chain(str(image))
        assert report.exit_code == 2
        assert "in use by another program" in str(report.findings[0])
    finally:
        writer.close()


def test_two_entries_for_one_block(tmp_path: Path) -> None:
    built = build_chain(tmp_path, 4 * MiB, [Layer(writes=[(0, 8)])])
    with open(built.leaf, "r+b") as f:
        f.seek(1536)
        first = f.read(4)
        f.seek(1540)
        f.write(first)
    sector = struct.unpack(">I", first)[0]
    assert _findings(built.leaf) == [
        f"error: {built.leaf}: BAT entries at sectors {sector} and {sector} overlap "
        "(a block spans 4097 sectors)"
    ]


def test_short_bat_is_refused_and_reported_once(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 4 * MiB)
    rewrite_header(image, {28: struct.pack(">I", 1)})  # one entry for a disk of two blocks
    expected = (
        f"dynamic header max table entries 1 cover {2 * MiB} bytes, less than the footer "
        f"current size {4 * MiB}"
    )
    with pytest.raises(CorruptMetadataError, match=re.escape(expected)):
        VhdImage.open(str(image))
    assert _findings(image) == [f"error: {image}: {expected}"]
