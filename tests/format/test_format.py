"""Format layer: checksums, geometry, record round trips, BAT pages, bitmaps."""

from __future__ import annotations

import itertools
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdfs.errors import ChecksumError, NotAVhdError
from vhdfs.format.bat import decode_entries, empty_table, encode_entries, table_bytes
from vhdfs.format.bitmap import SectorBitmap, bitmap_bytes
from vhdfs.format.checksum import vhd_checksum, with_checksum
from vhdfs.format.geometry import MAX_GEOMETRY, Geometry, geometry_for_size, geometry_to_store
from vhdfs.format.layout import DiskType
from vhdfs.format.records import (
    EMPTY_LOCATOR,
    DynamicHeader,
    Footer,
    ParentLocator,
    build_dynamic_header,
    build_footer,
    encode_parent_name,
    parse_dynamic_header,
    parse_footer,
)

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # Values QEMU, VirtualBox and blktap all compute identically.
        (64 * MiB, Geometry(963, 8, 17)),
        (GiB, Geometry(2080, 16, 63)),
        (100 * GiB, Geometry(51400, 16, 255)),
        (2040 * GiB, MAX_GEOMETRY),
        # From the sample corpus (qemu-img and blktap images).
        (7346176, Geometry(211, 4, 17)),
        (8388608, Geometry(240, 4, 17)),
    ],
)
def test_geometry_matches_the_spec(size: int, expected: Geometry) -> None:
    assert geometry_for_size(size) == expected


def test_geometry_to_store_falls_back_to_max_when_inexact() -> None:
    assert geometry_to_store(7346176) == Geometry(211, 4, 17)  # exact: keep CHS
    assert geometry_to_store(64 * MiB) == MAX_GEOMETRY  # 963*8*17 sectors is short
    assert MAX_GEOMETRY.is_max
    assert MAX_GEOMETRY.size == 136899993600


def test_checksum_of_known_footer() -> None:
    footer = with_checksum(b"conectix" + bytes(504), 64)
    assert vhd_checksum(footer, 64) == int.from_bytes(footer[64:68], "big")
    assert vhd_checksum(footer, 64) == ~sum(b"conectix") & 0xFFFFFFFF


footers = st.builds(
    Footer,
    features=st.integers(0, 0xFFFFFFFF),
    format_version=st.just(0x00010000),
    data_offset=st.integers(0, 2**64 - 1),
    timestamp=st.integers(0, 0xFFFFFFFF),
    creator_app=st.binary(min_size=4, max_size=4),
    creator_version=st.integers(0, 0xFFFFFFFF),
    creator_os=st.binary(min_size=4, max_size=4),
    original_size=st.integers(0, 2**64 - 1),
    current_size=st.integers(0, 2**64 - 1),
    geometry=st.builds(
        Geometry, st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0xFF)
    ),
    disk_type=st.sampled_from(list(DiskType)),
    checksum=st.just(0),
    unique_id=st.binary(min_size=16, max_size=16),
    saved_state=st.integers(0, 1),
    reserved=st.binary(min_size=427, max_size=427),
)


@given(footers)
def test_footer_round_trip(footer: Footer) -> None:
    raw = build_footer(footer)
    parsed = parse_footer(raw, "x.vhd")
    assert parsed == Footer(**{**_fields(footer), "checksum": parsed.checksum})
    assert build_footer(parsed) == raw
    # The old 511-byte form parses the same (its last byte is a reserved zero).
    if raw[-1] == 0:
        assert parse_footer(raw[:511], "x.vhd") == parsed


def _fields(record: object) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}  # type: ignore[attr-defined]


locators = st.builds(
    ParentLocator,
    platform_code=st.sampled_from([0, 0x57327275, 0x57326B75, 0x4D616358]),
    data_space=st.integers(0, 0xFFFFFFFF),
    data_length=st.integers(0, 0xFFFFFFFF),
    reserved=st.just(0),
    data_offset=st.integers(0, 2**64 - 1),
)


@given(
    locs=st.lists(locators, min_size=8, max_size=8),
    block_shift=st.integers(9, 28),
    name=st.text(max_size=40),
)
def test_header_round_trip(locs: list[ParentLocator], block_shift: int, name: str) -> None:
    header = DynamicHeader(
        data_offset=2**64 - 1,
        table_offset=1536,
        header_version=0x00010000,
        max_table_entries=1234,
        block_size=1 << block_shift,
        checksum=0,
        parent_unique_id=bytes(range(16)),
        parent_timestamp=42,
        parent_name_raw=encode_parent_name(name),
        locators=tuple(locs),
    )
    raw = build_dynamic_header(header)
    parsed = parse_dynamic_header(raw, "x.vhd")
    assert parsed.locators == tuple(locs)
    assert parsed.parent_name == name.split("\0")[0]
    assert build_dynamic_header(parsed) == raw


def test_footer_errors_name_the_field() -> None:
    raw = bytearray(build_footer(_sample_footer()))
    raw[70] ^= 1
    with pytest.raises(ChecksumError, match=r"^x\.vhd: footer checksum 0x[0-9a-f]{8} does not"):
        parse_footer(bytes(raw), "x.vhd")
    with pytest.raises(NotAVhdError, match="no 'conectix' cookie in the footer copy at offset 0"):
        parse_footer(bytes(512), "x.vhd", where="footer copy at offset 0")


def test_tap_hidden_flag_quirk_is_accepted() -> None:
    footer = Footer(
        **{**_fields(_sample_footer()), "creator_app": b"tap\0", "creator_version": 0x00010001}
    )
    raw = bytearray(build_footer(footer))
    raw[85] = 1  # tapdisk 1.1 sets the hidden byte without fixing the checksum
    assert parse_footer(bytes(raw), "x.vhd").reserved[0] == 1


def _sample_footer() -> Footer:
    return Footer(
        features=2,
        format_version=0x00010000,
        data_offset=512,
        timestamp=0,
        creator_app=b"vhfs",
        creator_version=1,
        creator_os=b"Wi2k",
        original_size=MiB,
        current_size=MiB,
        geometry=Geometry(30, 4, 17),
        disk_type=DiskType.DYNAMIC,
        checksum=0,
        unique_id=bytes(16),
        saved_state=0,
        reserved=bytes(427),
    )


def test_bat_pages() -> None:
    entries = array("I", [0xFFFFFFFF, 3, 0x12345678])
    raw = encode_entries(entries)
    assert raw == b"\xff\xff\xff\xff\x00\x00\x00\x03\x12\x34\x56\x78"
    assert decode_entries(raw) == entries
    assert table_bytes(1) == 512
    assert table_bytes(128) == 512
    assert table_bytes(129) == 1024
    assert empty_table(3) == b"\xff" * 512
    assert EMPTY_LOCATOR.is_empty


@pytest.mark.parametrize(
    ("sectors", "size"), [(1, 512), (8, 512), (1024, 512), (4096, 512), (8192, 1024)]
)
def test_bitmap_sizes(sectors: int, size: int) -> None:
    assert bitmap_bytes(sectors) == size


@given(
    bits=st.lists(st.booleans(), min_size=1, max_size=300),
    data=st.data(),
)
def test_bitmap_runs_match_bits(bits: list[bool], data: st.DataObject) -> None:
    raw = bytearray(-(-len(bits) // 8))
    for k, present in enumerate(bits):
        if present:
            raw[k // 8] |= 0x80 >> (k % 8)  # most significant bit first
    bitmap = SectorBitmap(raw, len(bits))
    first = data.draw(st.integers(0, len(bits) - 1))
    count = data.draw(st.integers(1, len(bits) - first))
    runs = bitmap.runs(first, count)
    expanded = [present for _, n, present in runs for _ in range(n)]
    assert expanded == bits[first : first + count]
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
    assert runs[0][0] == first
    assert bitmap.bits == "".join("1" if b else "0" for b in bits)


def test_bitmap_set_range() -> None:
    bitmap = SectorBitmap(bytes(512), 4096)
    bitmap.set_range(1, 3)
    bitmap.set_range(4095, 1)
    assert bitmap.raw[0] == 0b0111_0000
    assert bitmap.raw[511] == 1
    assert bitmap.runs(0, 5) == [(0, 1, False), (1, 3, True), (4, 1, False)]
