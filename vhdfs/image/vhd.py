"""VhdImage: one VHD file (fixed, dynamic or differencing), opened and validated.

Opening checks everything before anything is served: find a valid footer (the trailing
one, a 511-byte one, or the copy at offset 0), read and check the dynamic header, check that the
BAT fits in the file, then stream through the BAT once to check every allocated entry (inside
the file, clear of metadata, not overlapping another block) and to learn where data ends.
After ``open`` the image is trusted: requests are served from plain integers and arrays, and
construct is never used again for this file.

The BAT itself is not kept: pages of it are read on demand (``read_bat_page``) and cached by
the layers above, so a 2 TiB image costs a few kilobytes until it is used.
"""

from __future__ import annotations

import itertools
import logging
from array import array
from dataclasses import dataclass
from typing import Self

from vhdfs.errors import (
    CorruptMetadataError,
    FormatError,
    ImageError,
    NoSpaceError,
    NotAVhdError,
    TruncatedImageError,
    UnsupportedImageError,
)
from vhdfs.format.bat import BAT_PAGE_BYTES, BAT_PAGE_ENTRIES, decode_entries, table_bytes
from vhdfs.format.bitmap import SectorBitmap, bitmap_bytes
from vhdfs.format.layout import (
    BATMAP_COOKIE,
    BATMAP_HEADER,
    FOOTER_SIZE,
    HEADER_SIZE,
    OLD_FOOTER_SIZE,
    SECTOR,
    UNALLOCATED,
    VHDX_SIGNATURE,
    DiskType,
)
from vhdfs.format.records import DynamicHeader, Footer, parse_dynamic_header, parse_footer
from vhdfs.image.hostfile import HostFile

log = logging.getLogger(__name__)

#: blktap writes a batmap after the BAT from creator version 1.2; version 1.1 images may have
#: one too, so from 1.1 on the cookie decides.
_TAP_BATMAP_FROM = 0x00010001


@dataclass(frozen=True, slots=True)
class FooterLocation:
    """Where the footer that was used came from, and the state of the other copy."""

    footer: Footer
    #: Length of the trailing footer (512, or 511 for pre-2004 Virtual PC); 0 when missing.
    trailing_length: int
    #: Offset of the trailing footer (file size - its length); the end of usable data.
    trailing_offset: int
    #: True when the copy at offset 0 exists and equals the footer used.
    copy_matches: bool
    #: The footer exactly as stored (512 bytes), rewritten verbatim when it moves.
    raw: bytes = b""
    #: A problem worth a warning once the image has opened (a footer copy was used...).
    note: str | None = None


class VhdImage:
    """One VHD file, validated, with the geometry of its blocks precomputed.

    Use :meth:`open`. Attributes are read-only after opening except for the allocation state
    (``data_end``, ``allocated_blocks``), which the write path maintains.
    """

    def __init__(
        self,
        file: HostFile,
        location: FooterLocation,
        header: DynamicHeader | None,
    ) -> None:
        footer = location.footer
        self.file = file
        self.path = file.path
        self.footer = footer
        self.header = header
        self.kind = footer.disk_type
        self.trailing_footer_length = location.trailing_length
        self.trailing_footer_offset = location.trailing_offset
        self.footer_copy_matches = location.copy_matches
        self.footer_raw = location.raw
        #: Current size rounded down to whole sectors (the size Hyper-V, Azure and blktap use).
        self.virtual_size = footer.current_size - footer.current_size % SECTOR
        self.warnings: list[str] = [location.note] if location.note else []
        if header is None:
            self.block_size = 0
            self.sectors_per_block = 0
            self.bitmap_size = 0
            self.block_span = 0
            self.bat_entries = 0
        else:
            self.block_size = header.block_size
            self.sectors_per_block = header.block_size // SECTOR
            self.bitmap_size = bitmap_bytes(self.sectors_per_block)
            #: Bytes a block occupies in the file: bitmap then data.
            self.block_span = self.bitmap_size + self.block_size
            needed = -(-self.virtual_size // self.block_size)
            #: BAT entries that describe the disk (blktap tables hold more, for growth).
            self.bat_entries = min(header.max_table_entries, needed)
        self.meta_end = 0
        self.data_end = 0
        self.allocated_blocks = 0
        #: Where the next block may start: past metadata, data and the footer.
        self.next_free = 0
        #: Why the BAT cannot describe the whole disk, when it cannot (then never written).
        self.short_table: str | None = None

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool = False) -> Self:
        """Open and validate ``path``.

        Args:
            path: The image file.
            writable: Open the host file for writing (the caller decides whether the image's
                state allows writes; see ``write_problem``).

        Raises:
            ImageError: Any problem that makes the image unusable, as a one-line message.
        """
        file = HostFile.open(path, writable=writable)
        try:
            location = _locate_footer(file)
            header = None
            if location.footer.disk_type != DiskType.FIXED:
                header = _read_header(file, location)
            image = cls(file, location, header)
            image._validate()
        except BaseException:
            file.close()
            raise
        for warning in image.warnings:
            log.warning("%s: %s", path, warning)
        return image

    def _validate(self) -> None:
        if self.kind == DiskType.FIXED:
            data_size = self.trailing_footer_offset
            if self.virtual_size > data_size:
                raise TruncatedImageError(
                    self.path,
                    f"fixed disk: footer current size {self.virtual_size} needs that many "
                    f"bytes of data before the footer, but the file holds {data_size}",
                )
            return
        header = self.header
        assert header is not None
        self._check_layout(header)
        self._scan_bat()

    def _data_limit(self) -> int:
        """End of the area blocks may occupy: the trailing footer, or EOF when it is missing."""
        if self.trailing_footer_length:
            return self.trailing_footer_offset
        return self.file.size

    def _check_layout(self, header: DynamicHeader) -> None:
        limit = self._data_limit()
        table = header.table_offset
        table_len = table_bytes(header.max_table_entries)
        needed = -(-self.virtual_size // self.block_size)
        if header.max_table_entries < needed:
            self.short_table = (
                f"dynamic header max table entries {header.max_table_entries} cover "
                f"{header.max_table_entries * self.block_size} bytes, less than the disk's "
                f"{self.virtual_size}; the rest reads as zeros"
            )
            self._warn(self.short_table)
        header_end = self.footer.data_offset + HEADER_SIZE
        if (table < header_end and table + table_len > self.footer.data_offset) or table < SECTOR:
            raise CorruptMetadataError(
                self.path,
                f"dynamic header table offset {table} overlaps the footer copy or the header",
            )
        if table + header.max_table_entries * 4 > limit:
            raise TruncatedImageError(
                self.path,
                f"BAT of {header.max_table_entries} entries at offset {table} needs "
                f"{header.max_table_entries * 4} bytes but the file's data ends at {limit}",
            )
        meta_end = max(header_end, table + table_len)
        meta_end = max(meta_end, self._check_batmap(header, table + table_len, limit))
        if self.kind == DiskType.DIFFERENCING:
            if header.parent_unique_id == bytes(16):
                raise UnsupportedImageError(
                    self.path,
                    "differencing disk with an all-zero parent unique id (a blktap raw "
                    "parent) is not supported",
                )
            for slot, loc in enumerate(header.locators):
                if loc.is_empty:
                    continue
                end = loc.data_offset + max(loc.data_length, loc.space_bytes)
                if loc.data_offset + loc.data_length > self.file.size:
                    self._warn(
                        f"parent locator {slot} ({loc.platform_name}) data at offset "
                        f"{loc.data_offset} runs past the end of file; ignored"
                    )
                    continue
                meta_end = max(meta_end, end)
        self.meta_end = meta_end

    def _check_batmap(self, header: DynamicHeader, offset: int, limit: int) -> int:
        """Recognise blktap's batmap; return the end of its area (or 0)."""
        if self.footer.creator_app != b"tap\0" or self.footer.creator_version < _TAP_BATMAP_FROM:
            return 0
        if offset + SECTOR > limit:
            return 0
        raw = self.file.pread_exact(offset, SECTOR, "batmap header")
        if raw[:8] != BATMAP_COOKIE:
            return 0
        batmap = BATMAP_HEADER.parse(raw)
        if batmap.keyhash_set:
            raise UnsupportedImageError(
                self.path, "blktap batmap keyhash is set: the image is encrypted by tapdisk"
            )
        return int(max(offset + SECTOR, batmap.batmap_offset + batmap.batmap_size * SECTOR))

    def _scan_bat(self) -> None:
        """Check every allocated BAT entry and find where data ends, one page at a time."""
        limit = self._data_limit()
        span_sectors = self.block_span // SECTOR
        starts = array("I")
        data_end = 0
        count = 0
        unallocated_page = b"\xff" * BAT_PAGE_BYTES
        for page in range(-(-self.bat_entries // BAT_PAGE_ENTRIES)):
            raw = self._read_bat_bytes(page)
            if raw == unallocated_page[: len(raw)]:
                continue
            first = page * BAT_PAGE_ENTRIES
            for index, entry in enumerate(decode_entries(raw), first):
                if entry == UNALLOCATED:
                    continue
                start = entry * SECTOR
                end = start + self.block_span
                if start < self.meta_end:
                    raise CorruptMetadataError(
                        self.path,
                        f"BAT entry {index} = sector {entry} (offset {start}) lies inside "
                        f"the image's metadata, which ends at {self.meta_end}",
                    )
                if end > limit:
                    if self.trailing_footer_length:
                        raise CorruptMetadataError(
                            self.path,
                            f"BAT entry {index} = sector {entry}: block at offset {start} "
                            f"ends at {end}, beyond the end of data at {limit}",
                        )
                    raise TruncatedImageError(
                        self.path,
                        f"file is truncated: block {index} at offset {start} ends at {end} "
                        f"but the file ends at {limit} and its trailing footer is missing",
                    )
                starts.append(entry)
                data_end = max(data_end, end)
                count += 1
        self._check_overlaps(starts, span_sectors)
        self.data_end = data_end
        self.allocated_blocks = count
        free = max(self.meta_end, data_end, self.trailing_footer_offset)
        self.next_free = -(-free // SECTOR) * SECTOR

    def _check_overlaps(self, starts: array[int], span_sectors: int) -> None:
        pairs = itertools.pairwise(starts)
        ordered = starts if all(a < b for a, b in pairs) else sorted(starts)
        for a, b in itertools.pairwise(ordered):
            if b - a < span_sectors:
                raise CorruptMetadataError(
                    self.path,
                    f"BAT entries at sectors {a} and {b} overlap (a block spans "
                    f"{span_sectors} sectors)",
                )

    def _warn(self, message: str) -> None:
        """Record a problem that does not stop the image from opening (logged by ``open``)."""
        self.warnings.append(message)

    # -- metadata access (used through the block cache) ------------------------------------

    @property
    def bat_pages(self) -> int:
        """Number of BAT cache pages."""
        return -(-self.bat_entries // BAT_PAGE_ENTRIES)

    def _read_bat_bytes(self, page: int) -> bytes:
        assert self.header is not None
        first = page * BAT_PAGE_ENTRIES
        count = min(BAT_PAGE_ENTRIES, self.bat_entries - first)
        return self.file.pread_exact(
            self.header.table_offset + first * 4, count * 4, f"BAT page {page}"
        )

    def read_bat_page(self, page: int) -> array[int]:
        """Entries ``[page * BAT_PAGE_ENTRIES, ...)`` of the BAT, read from the file."""
        return decode_entries(self._read_bat_bytes(page))

    def read_bitmap(self, entry: int) -> SectorBitmap:
        """The sector bitmap of the block whose BAT entry is ``entry``."""
        raw = self.file.pread_exact(entry * SECTOR, self.bitmap_size, "block bitmap")
        return SectorBitmap(raw, self.sectors_per_block)

    def data_offset(self, entry: int) -> int:
        """File offset of the first data byte of the block whose BAT entry is ``entry``."""
        return entry * SECTOR + self.bitmap_size

    # -- writing -------------------------------------------------------------------------

    def write_problem(self) -> str | None:
        """Why writing to this image would be unsafe, or ``None`` when it is safe."""
        if self.footer.saved_state:
            return (
                "footer saved state is set: a Virtual PC virtual machine was saved with this "
                "disk, and writing would make its saved memory disagree with the disk"
            )
        if self.kind == DiskType.FIXED:
            return None
        if not self.trailing_footer_length:
            return "the trailing footer is missing or damaged; only the copy at offset 0 is valid"
        if not self.footer_copy_matches:
            return "the footer copy at offset 0 differs from the trailing footer"
        return self.short_table

    def reserve_block(self, block: int) -> Allocation:
        """Reserve room for block ``block`` at the end of the file.

        The block's data starts on a 4 KiB boundary past everything the file holds, so it never
        reuses space that might hold stale bytes. The room stays reserved even if writing the
        block fails (it is then leaked, never reused). Call ``commit_allocation`` once the BAT
        entry is written.

        Raises:
            NoSpaceError: The block would start beyond what a 32-bit BAT entry can address.
        """
        data = -(-(self.next_free + self.bitmap_size) // 4096) * 4096
        start = data - self.bitmap_size
        entry = start // SECTOR
        if entry >= UNALLOCATED:
            raise NoSpaceError(
                self.path,
                f"no room for block {block}: it would start at sector {entry}, beyond the last "
                "sector a BAT entry can address",
            )
        allocation = Allocation(
            block=block,
            entry=entry,
            old_footer_end=self.file.size,
            bitmap_offset=start,
            data_offset=data,
            end=data + self.block_size,
        )
        self.next_free = allocation.end
        return allocation

    def commit_allocation(self, allocation: Allocation) -> None:
        """Account for a block whose BAT entry now points at it."""
        self.data_end = max(self.data_end, allocation.end)
        self.allocated_blocks += 1

    def close(self) -> None:
        """Close the host file."""
        self.file.close()


@dataclass(frozen=True, slots=True)
class Allocation:
    """The placement of a new block (all offsets in bytes of the file)."""

    block: int
    #: The BAT entry: the sector of the block's bitmap.
    entry: int
    #: The old end of file: the old trailing footer ends here. Everything of the new block
    #: from here on is a hole, so its unwritten sectors read as zeros.
    old_footer_end: int
    bitmap_offset: int
    data_offset: int
    #: End of the block, where the trailing footer moves.
    end: int


def _locate_footer(file: HostFile) -> FooterLocation:
    """Find the footer to trust: trailing first (512 or 511 bytes), then the copy at 0."""
    size = file.size
    if size < FOOTER_SIZE - 1:
        raise NotAVhdError(file.path, f"not a VHD image: the file is only {size} bytes")
    head = file.pread(0, FOOTER_SIZE)
    if head[:8] == VHDX_SIGNATURE:
        raise UnsupportedImageError(file.path, "this is a VHDX image; only VHD is supported")
    trailing_length = OLD_FOOTER_SIZE if size % SECTOR == OLD_FOOTER_SIZE else FOOTER_SIZE
    trailing_offset = size - trailing_length
    trailing_raw = file.pread(trailing_offset, trailing_length).ljust(FOOTER_SIZE, b"\0")
    trailing, trailing_error = _try_footer(file, trailing_raw, "footer")
    copy, copy_error = None, None
    if trailing_offset > 0 and (trailing is None or trailing.disk_type != DiskType.FIXED):
        copy, copy_error = _try_footer(file, head, "footer copy at offset 0")
        if copy is not None and copy.disk_type == DiskType.FIXED:
            copy = None  # offset 0 of a fixed disk is guest data, never a footer copy
    if trailing is not None:
        note = None
        if copy is not None and copy != trailing:
            note = "the footer copy at offset 0 differs from the trailing footer; using the latter"
        return FooterLocation(
            trailing, trailing_length, trailing_offset, copy == trailing, trailing_raw, note
        )
    assert trailing_error is not None
    if copy is not None:
        note = f"trailing footer unusable ({trailing_error.message}); using the copy at offset 0"
        return FooterLocation(copy, 0, size, True, head, note)
    # Report the most specific problem: a damaged footer beats "no footer at all".
    if isinstance(trailing_error, NotAVhdError) and not isinstance(copy_error, NotAVhdError | None):
        raise copy_error
    raise trailing_error


def _try_footer(
    file: HostFile, raw: bytes, where: str
) -> tuple[Footer, None] | tuple[None, ImageError]:
    try:
        return parse_footer(raw, file.path, where=where), None
    except ImageError as exc:
        return None, exc


def _read_header(file: HostFile, location: FooterLocation) -> DynamicHeader:
    offset = location.footer.data_offset
    limit = location.trailing_offset if location.trailing_length else file.size
    if offset < SECTOR or offset % SECTOR or offset + HEADER_SIZE > limit:
        raise FormatError(
            file.path,
            f"footer data offset {offset} does not point at a dynamic header inside the file "
            f"(expected a multiple of 512 from 512 to {limit - HEADER_SIZE})",
        )
    raw = file.pread_exact(offset, HEADER_SIZE, "dynamic header")
    return parse_dynamic_header(raw, file.path)
