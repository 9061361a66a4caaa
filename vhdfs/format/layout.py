"""Byte layouts of the VHD structures, as construct Structs, and the format's constants.

This package is the only place that imports construct. All integers are big-endian (spec:
"Hard Disk Footer Format"); the only little-endian data in a VHD are the UTF-16 strings inside
Windows parent locators, which are decoded in ``records``.
"""

from __future__ import annotations

from enum import IntEnum

from construct import Array, Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

SECTOR = 512
FOOTER_SIZE = 512
OLD_FOOTER_SIZE = 511  # Virtual PC before 2004 dropped the last reserved byte
HEADER_SIZE = 1024
LOCATOR_COUNT = 8

FOOTER_COOKIE = b"conectix"
POISON_COOKIE = b"v_poison"  # blktap marks a disabled image this way
HEADER_COOKIE = b"cxsparse"
VHDX_SIGNATURE = b"vhdxfile"
BATMAP_COOKIE = b"tdbatmap"

FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURE_RESERVED = 0x2
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
UNALLOCATED = 0xFFFFFFFF

#: Where block data starts: Windows (aligned VHDs), blktap and vhdfs put it on 4 KiB
#: boundaries, padding before each block's bitmap. Gaps shorter than this are padding.
DATA_ALIGNMENT = 4096

#: Offsets of the checksum fields, for the checksum helpers.
FOOTER_CHECKSUM_OFFSET = 64
HEADER_CHECKSUM_OFFSET = 36
#: Footer byte blktap uses as its "hidden" flag.
FOOTER_HIDDEN_OFFSET = 85

#: Seconds between the Unix epoch and the VHD epoch, 2000-01-01 00:00:00 UTC.
VHD_EPOCH = 946_684_800


class DiskType(IntEnum):
    """Footer disk type (only these three exist in practice)."""

    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


class PlatformCode(IntEnum):
    """Parent locator platform codes."""

    NONE = 0
    WI2R = 0x57693272  # "Wi2r": deprecated relative path, 8-bit
    WI2K = 0x5769326B  # "Wi2k": deprecated absolute path, 8-bit
    W2RU = 0x57327275  # "W2ru": relative path, UTF-16LE
    W2KU = 0x57326B75  # "W2ku": absolute path, UTF-16LE
    MAC = 0x4D616320  # "Mac ": Mac OS alias record, not resolvable here
    MACX = 0x4D616358  # "MacX": file URL, UTF-8


FOOTER = Struct(
    "cookie" / Bytes(8),
    "features" / Int32ub,
    "format_version" / Int32ub,
    "data_offset" / Int64ub,
    "timestamp" / Int32ub,
    "creator_app" / Bytes(4),
    "creator_version" / Int32ub,
    "creator_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "cylinders" / Int16ub,
    "heads" / Int8ub,
    "sectors_per_track" / Int8ub,
    "disk_type" / Int32ub,
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)

PARENT_LOCATOR = Struct(
    "platform_code" / Int32ub,
    "data_space" / Int32ub,
    "data_length" / Int32ub,
    "reserved" / Int32ub,
    "data_offset" / Int64ub,
)

DYNAMIC_HEADER = Struct(
    "cookie" / Bytes(8),
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,
    "header_version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_unique_id" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved1" / Bytes(4),
    "parent_name" / Bytes(512),
    "locators" / Array(LOCATOR_COUNT, PARENT_LOCATOR),
    "reserved2" / Bytes(256),
)

#: blktap's batmap header; only the fields vhdfs needs to recognise encryption.
BATMAP_HEADER = Struct(
    "cookie" / Bytes(8),
    "batmap_offset" / Int64ub,
    "batmap_size" / Int32ub,
    "batmap_version" / Int32ub,
    "checksum" / Int32ub,
    "marker" / Int8ub,
    "keyhash_set" / Int8ub,
    "keyhash" / Bytes(64),
    "reserved" / Bytes(418),
)

assert FOOTER.sizeof() == FOOTER_SIZE
assert DYNAMIC_HEADER.sizeof() == HEADER_SIZE
assert PARENT_LOCATOR.sizeof() == 24
assert BATMAP_HEADER.sizeof() == SECTOR
