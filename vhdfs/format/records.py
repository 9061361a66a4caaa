"""Typed records for the footer, the dynamic header and parent locators, with parse and build.

``parse_*`` turn bytes into frozen dataclasses and check what can be checked without the file
around them: cookies, checksums, versions, enumerations, block size. Checks that need the file
(offsets inside it, sizes against its length) live in ``vhdfs.image.vhd``. ``build_*`` go the
other way and always recompute the checksum. ``parse(build(x)) == x`` for every valid record.

Every error names the source file and the field, and says what was found and what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError

from vhdfs.errors import ChecksumError, FormatError, NotAVhdError, UnsupportedImageError
from vhdfs.format.checksum import vhd_checksum, with_checksum
from vhdfs.format.geometry import Geometry
from vhdfs.format.layout import (
    BATMAP_COOKIE,
    BATMAP_HEADER,
    DYNAMIC_HEADER,
    FOOTER,
    FOOTER_CHECKSUM_OFFSET,
    FOOTER_COOKIE,
    FOOTER_HIDDEN_OFFSET,
    FOOTER_SIZE,
    FORMAT_VERSION,
    HEADER_CHECKSUM_OFFSET,
    HEADER_COOKIE,
    HEADER_SIZE,
    HEADER_VERSION,
    LOCATOR_COUNT,
    POISON_COOKIE,
    SECTOR,
    DiskType,
    PlatformCode,
)

#: Largest block size vhdfs accepts. The spec allows any power of two; real images use 512 KiB
#: to 2 MiB, Windows at most 256 MiB. A cap keeps a hostile header from asking for huge buffers.
MAX_BLOCK_SIZE = 256 << 20


def _hex(value: int) -> str:
    return f"0x{value:08x}"


@dataclass(frozen=True, slots=True)
class Footer:
    """The hard disk footer. ``reserved`` is kept verbatim for rewriting."""

    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    geometry: Geometry
    disk_type: DiskType
    checksum: int
    unique_id: bytes
    saved_state: int
    reserved: bytes = field(repr=False)
    cookie: bytes = FOOTER_COOKIE

    @property
    def creator(self) -> str:
        """Creator application as printable text, e.g. ``qemu`` or ``tap`` plus a NUL."""
        return self.creator_app.decode("latin-1")

    @property
    def creator_version_text(self) -> str:
        """Creator version as ``major.minor``."""
        return f"{self.creator_version >> 16}.{self.creator_version & 0xFFFF}"


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """One of the eight parent locator entries of a dynamic header."""

    platform_code: int
    data_space: int
    data_length: int
    reserved: int
    data_offset: int

    @property
    def is_empty(self) -> bool:
        """True for an unused slot."""
        return self.platform_code == PlatformCode.NONE

    @property
    def platform_name(self) -> str:
        """Platform code as its four characters (``W2ru``), or hex when not printable."""
        text = self.platform_code.to_bytes(4, "big").decode("latin-1")
        return text if text.isprintable() else _hex(self.platform_code)

    @property
    def space_bytes(self) -> int:
        """Room reserved for the locator data, in bytes.

        The spec says sectors, but Windows, VirtualBox and blktap store bytes. blktap's rule
        works for every file seen: below 512 it is a sector count, otherwise bytes.
        """
        if self.data_space < SECTOR:
            return self.data_space * SECTOR
        return self.data_space


EMPTY_LOCATOR = ParentLocator(0, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """The dynamic disk header of dynamic and differencing images."""

    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes
    parent_timestamp: int
    parent_name_raw: bytes = field(repr=False)
    locators: tuple[ParentLocator, ...]
    reserved1: bytes = field(default=bytes(4), repr=False)
    reserved2: bytes = field(default=bytes(256), repr=False)

    @property
    def parent_name(self) -> str:
        """The parent's Unicode name (UTF-16BE in the file), NULs stripped.

        Not guaranteed to be valid UTF-16 (libvhdi has seen unpaired surrogates), so broken
        code units become U+FFFD rather than an error.
        """
        return self.parent_name_raw.decode("utf-16-be", errors="replace").split("\0", 1)[0]


def _parse(struct: Any, raw: bytes, source: str, what: str) -> Any:
    try:
        return struct.parse(raw)
    except ConstructError as exc:  # only on short input, which callers rule out
        raise FormatError(source, f"{what} cannot be parsed: {exc}") from exc


def parse_footer(raw: bytes, source: str, *, where: str = "footer") -> Footer:
    """Parse and check a 512-byte footer (or a 511-byte one from old Virtual PC).

    Args:
        raw: 511 or 512 bytes.
        source: The file name, for messages.
        where: Which copy this is, for messages (``"footer"``, ``"footer copy at offset 0"``).

    Raises:
        NotAVhdError: No ``conectix`` cookie.
        UnsupportedImageError: blktap's ``v_poison`` cookie (a disabled image).
        ChecksumError: The checksum does not match.
        FormatError: Unknown format version or disk type.
    """
    if len(raw) == FOOTER_SIZE - 1:
        raw = raw + b"\0"
    if len(raw) != FOOTER_SIZE:
        raise FormatError(source, f"{where} is {len(raw)} bytes, expected {FOOTER_SIZE}")
    cookie = raw[:8]
    if cookie == POISON_COOKIE:
        raise UnsupportedImageError(
            source, f"{where} cookie is 'v_poison': the image was disabled by blktap"
        )
    if cookie != FOOTER_COOKIE:
        raise NotAVhdError(source, f"not a VHD image: no 'conectix' cookie in the {where}")
    parsed = _parse(FOOTER, raw, source, where)
    computed = vhd_checksum(raw, FOOTER_CHECKSUM_OFFSET)
    if parsed.checksum != computed and not _tap_hidden_checksum_ok(raw, parsed):
        raise ChecksumError(
            source,
            f"{where} checksum {_hex(parsed.checksum)} does not match computed {_hex(computed)}",
        )
    if parsed.format_version != FORMAT_VERSION:
        raise FormatError(
            source,
            f"{where} format version {_hex(parsed.format_version)} is not "
            f"{_hex(FORMAT_VERSION)} (VHD 1.0)",
        )
    try:
        disk_type = DiskType(parsed.disk_type)
    except ValueError:
        raise FormatError(
            source,
            f"{where} disk type {parsed.disk_type} is not 2 (fixed), 3 (dynamic) "
            "or 4 (differencing)",
        ) from None
    return Footer(
        features=parsed.features,
        format_version=parsed.format_version,
        data_offset=parsed.data_offset,
        timestamp=parsed.timestamp,
        creator_app=parsed.creator_app,
        creator_version=parsed.creator_version,
        creator_os=parsed.creator_os,
        original_size=parsed.original_size,
        current_size=parsed.current_size,
        geometry=Geometry(parsed.cylinders, parsed.heads, parsed.sectors_per_track),
        disk_type=disk_type,
        checksum=parsed.checksum,
        unique_id=parsed.unique_id,
        saved_state=parsed.saved_state,
        reserved=parsed.reserved,
    )


def _tap_hidden_checksum_ok(raw: bytes, parsed: Any) -> bool:
    """Accept blktap 0.1/1.1 footers: they set the hidden byte without updating the checksum."""
    if parsed.creator_app != b"tap\0" or parsed.creator_version not in (0x00000001, 0x00010001):
        return False
    patched = raw[:FOOTER_HIDDEN_OFFSET] + b"\0" + raw[FOOTER_HIDDEN_OFFSET + 1 :]
    return vhd_checksum(patched, FOOTER_CHECKSUM_OFFSET) == int(parsed.checksum)


def build_footer(footer: Footer) -> bytes:
    """Serialize a footer to 512 bytes with a freshly computed checksum."""
    raw = FOOTER.build(
        {
            "cookie": footer.cookie,
            "features": footer.features,
            "format_version": footer.format_version,
            "data_offset": footer.data_offset,
            "timestamp": footer.timestamp,
            "creator_app": footer.creator_app,
            "creator_version": footer.creator_version,
            "creator_os": footer.creator_os,
            "original_size": footer.original_size,
            "current_size": footer.current_size,
            "cylinders": footer.geometry.cylinders,
            "heads": footer.geometry.heads,
            "sectors_per_track": footer.geometry.sectors_per_track,
            "disk_type": int(footer.disk_type),
            "checksum": 0,
            "unique_id": footer.unique_id,
            "saved_state": footer.saved_state,
            "reserved": footer.reserved,
        }
    )
    return with_checksum(raw, FOOTER_CHECKSUM_OFFSET)


def parse_dynamic_header(raw: bytes, source: str) -> DynamicHeader:
    """Parse and check the 1024-byte dynamic disk header.

    Raises:
        FormatError: Bad cookie, version or block size.
        ChecksumError: The checksum does not match.
    """
    if len(raw) != HEADER_SIZE:
        raise FormatError(source, f"dynamic header is {len(raw)} bytes, expected {HEADER_SIZE}")
    if raw[:8] != HEADER_COOKIE:
        raise FormatError(
            source, f"dynamic header cookie is {raw[:8]!r}, expected {HEADER_COOKIE!r}"
        )
    parsed = _parse(DYNAMIC_HEADER, raw, source, "dynamic header")
    computed = vhd_checksum(raw, HEADER_CHECKSUM_OFFSET)
    if parsed.checksum != computed:
        raise ChecksumError(
            source,
            f"dynamic header checksum {_hex(parsed.checksum)} does not match "
            f"computed {_hex(computed)}",
        )
    if parsed.header_version != HEADER_VERSION:
        raise FormatError(
            source,
            f"dynamic header version {_hex(parsed.header_version)} is not {_hex(HEADER_VERSION)}",
        )
    block_size = parsed.block_size
    if block_size < SECTOR or block_size & (block_size - 1):
        raise FormatError(
            source,
            f"dynamic header block size {block_size} is not a power of two of at least 512",
        )
    if block_size > MAX_BLOCK_SIZE:
        raise UnsupportedImageError(
            source,
            f"dynamic header block size {block_size} exceeds the supported maximum "
            f"{MAX_BLOCK_SIZE} (256 MiB)",
        )
    locators = tuple(
        ParentLocator(
            platform_code=loc.platform_code,
            data_space=loc.data_space,
            data_length=loc.data_length,
            reserved=loc.reserved,
            data_offset=loc.data_offset,
        )
        for loc in parsed.locators
    )
    return DynamicHeader(
        data_offset=parsed.data_offset,
        table_offset=parsed.table_offset,
        header_version=parsed.header_version,
        max_table_entries=parsed.max_table_entries,
        block_size=block_size,
        checksum=parsed.checksum,
        parent_unique_id=parsed.parent_unique_id,
        parent_timestamp=parsed.parent_timestamp,
        parent_name_raw=parsed.parent_name,
        locators=locators,
        reserved1=parsed.reserved1,
        reserved2=parsed.reserved2,
    )


def build_dynamic_header(header: DynamicHeader) -> bytes:
    """Serialize a dynamic header to 1024 bytes with a freshly computed checksum."""
    locators = list(header.locators) + [EMPTY_LOCATOR] * (LOCATOR_COUNT - len(header.locators))
    raw = DYNAMIC_HEADER.build(
        {
            "cookie": HEADER_COOKIE,
            "data_offset": header.data_offset,
            "table_offset": header.table_offset,
            "header_version": header.header_version,
            "max_table_entries": header.max_table_entries,
            "block_size": header.block_size,
            "checksum": 0,
            "parent_unique_id": header.parent_unique_id,
            "parent_timestamp": header.parent_timestamp,
            "reserved1": header.reserved1,
            "parent_name": header.parent_name_raw,
            "locators": [dataclasses.asdict(loc) for loc in locators],
            "reserved2": header.reserved2,
        }
    )
    return with_checksum(raw, HEADER_CHECKSUM_OFFSET)


def encode_parent_name(name: str) -> bytes:
    """The header's parent name field: UTF-16BE, NUL-padded to 512 bytes."""
    raw = name.encode("utf-16-be")
    if len(raw) > 512:
        raise ValueError(f"parent name {name!r} is longer than 256 UTF-16 code units")
    return raw.ljust(512, b"\0")


@dataclass(frozen=True, slots=True)
class BatmapHeader:
    """blktap's batmap header: where its one-bit-per-block map lies, and the encryption flag."""

    batmap_offset: int
    #: Size of the map in sectors.
    batmap_size: int
    batmap_version: int
    keyhash_set: bool


def parse_batmap_header(raw: bytes, source: str) -> BatmapHeader | None:
    """Parse the 512 bytes after a blktap BAT; ``None`` when they hold no batmap header."""
    if len(raw) != SECTOR or raw[:8] != BATMAP_COOKIE:
        return None
    parsed = _parse(BATMAP_HEADER, raw, source, "batmap header")
    return BatmapHeader(
        batmap_offset=parsed.batmap_offset,
        batmap_size=parsed.batmap_size,
        batmap_version=parsed.batmap_version,
        keyhash_set=bool(parsed.keyhash_set),
    )
