"""VhdImage: one VHD file (fixed, dynamic or differencing), opened and validated.

Opening checks everything before anything is served: find a valid footer (the trailing
one, a 511-byte one, or the copy at offset 0), read and check the dynamic header, check that
the BAT covers the whole disk, that every structure (footer copy, header, BAT, blktap's batmap,
each parent locator's data) lies inside the file and overlaps no other, then stream through
the BAT once, checking each allocated block the same way as it comes (see ``regions``), and
learn where data ends. A table that claims more blocks than the file can hold is refused as
soon as that shows: what opening costs follows what the file holds, not what its header claims.
No order of structures is assumed: the spec fixes none. After ``open`` the image is trusted:
requests are served from plain integers and arrays, and construct is never used again for this
file.

Problems that do not stop an image from opening (a footer copy that differs, a locator
pointing past the end of the file) are collected in ``warnings``, never logged here: the
command that opened the image reports each once, and not at all when the command fails.

The BAT itself is not kept: pages of it are read on demand (``read_bat_page``) and cached by
the layers above, so a 2 TiB image costs a few kilobytes until it is used.
"""

from __future__ import annotations

from array import array
from dataclasses import replace
from typing import Self

from vhdfs.errors import (
    CorruptMetadataError,
    FormatError,
    ImageError,
    Notice,
    TruncatedImageError,
    UnsupportedImageError,
)
from vhdfs.format.bat import BAT_PAGE_BYTES, BAT_PAGE_ENTRIES, decode_entries, table_bytes
from vhdfs.format.bitmap import SectorBitmap, bitmap_bytes
from vhdfs.format.layout import FOOTER_SIZE, HEADER_SIZE, SECTOR, UNALLOCATED, DiskType
from vhdfs.format.records import (
    DynamicHeader,
    parse_batmap_header,
    parse_dynamic_header,
    parse_footer,
)
from vhdfs.image.footer import FooterLocation, locate_footer
from vhdfs.image.hostfile import HostFile
from vhdfs.image.regions import (
    BlockStarts,
    MetadataGuard,
    Region,
    block_capacity,
    check_disjoint,
)

#: blktap writes a batmap after the BAT from creator version 1.2; version 1.1 images may have
#: one too, so from 1.1 on the cookie decides.
_TAP_BATMAP_FROM = 0x00010001

#: Sizes are served as ``off_t``: a disk must be smaller than 2^63 bytes.
MAX_VIRTUAL_SIZE = (1 << 63) - 1


class VhdImage:
    """One VHD file, validated, with the geometry of its blocks precomputed.

    Use :meth:`open`. Attributes are read-only after opening except for the allocation state
    (``data_end``, ``allocated_blocks``, ``next_free``), which the write path maintains as it
    executes plans of ``vhdfs.image.commit``.
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
        self.warnings: list[Notice] = [location.note] if location.note else []
        #: Those of the warnings that also make writing unsafe (see ``write_problem``).
        self.write_hazards: list[Notice] = []
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
            #: BAT entries that describe the disk (blktap tables hold more, for growth).
            self.bat_entries = -(-self.virtual_size // self.block_size)
        #: Every structure but the blocks, sorted by offset (see ``regions``).
        self.metadata: list[Region] = []
        #: The same with each locator's reserved space counted in full (its data may grow
        #: into it): nothing new is placed there, and it is not leaked space.
        self.reserved: list[Region] = []
        self.data_end = 0
        self.allocated_blocks = 0
        #: Where the next block may start: past metadata, data and the footer.
        self.next_free = 0

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
            location = locate_footer(file)
            header = None
            if location.footer.disk_type != DiskType.FIXED:
                header = _read_header(file, location)
            image = cls(file, location, header)
            image._validate()
        except BaseException:
            file.close()
            raise
        return image

    def _validate(self) -> None:
        size = self.footer.current_size
        if size > MAX_VIRTUAL_SIZE:
            raise FormatError(
                self.path,
                f"footer current size {size} is beyond the largest file size Linux can serve "
                f"({MAX_VIRTUAL_SIZE} bytes)",
            )
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
        self._check_table_covers_disk(header)
        self._check_metadata(header)
        self._scan_bat()

    def _check_table_covers_disk(self, header: DynamicHeader) -> None:
        """Refuse a BAT with fewer entries than the disk has blocks.

        QEMU refuses it too ("Page table too small"): serving the rest as zeros would hide
        whatever the file holds there.
        """
        if header.max_table_entries < self.bat_entries:
            raise CorruptMetadataError(
                self.path,
                f"dynamic header max table entries {header.max_table_entries} cover "
                f"{header.max_table_entries * self.block_size} bytes, less than the footer "
                f"current size {self.virtual_size}",
            )

    def _check_metadata(self, header: DynamicHeader) -> None:
        """Place every structure but the blocks; each inside the data area, none overlapping."""
        limit = self.trailing_footer_offset
        table = header.table_offset
        table_end = table + header.max_table_entries * 4
        if table_end > limit:
            raise TruncatedImageError(
                self.path,
                f"BAT of {header.max_table_entries} entries at offset {table} needs "
                f"{header.max_table_entries * 4} bytes but the file's data ends at {limit}",
            )
        regions = [
            Region(0, FOOTER_SIZE, "footer copy"),
            Region(
                self.footer.data_offset, self.footer.data_offset + HEADER_SIZE, "dynamic header"
            ),
            # BAT sectors are written whole (a torn 4-byte write could spread to its
            # neighbours), so the table owns every file sector it touches.
            Region(table, -(-table_end // SECTOR) * SECTOR, "BAT"),
        ]
        regions += self._batmap_regions(table + table_bytes(header.max_table_entries), limit)
        reserved: list[Region] = []
        if self.kind == DiskType.DIFFERENCING:
            if header.parent_unique_id == bytes(16):
                raise UnsupportedImageError(
                    self.path,
                    "differencing disk with an all-zero parent unique id (a blktap raw "
                    "parent) is not supported",
                )
            for slot, loc in enumerate(header.locators):
                if loc.is_empty or not loc.data_length:
                    continue
                name = f"parent locator {slot} ({loc.platform_name}) data"
                if loc.data_offset + loc.data_length > limit:
                    # Unusable, and a hazard: a write would grow the file into it.
                    warning = Notice(
                        "locator-past-end",
                        f"{name} at offset {loc.data_offset} runs past the end of the file; "
                        "ignored, and the image is not written",
                    )
                    self.warnings.append(warning)
                    self.write_hazards.append(warning)
                    continue
                regions.append(Region(loc.data_offset, loc.data_offset + loc.data_length, name))
                space = max(loc.data_length, loc.space_bytes)
                reserved.append(Region(loc.data_offset, loc.data_offset + space, name))
        self.metadata = check_disjoint(self.path, regions)
        self.reserved = sorted(self.metadata + reserved)

    def _batmap_regions(self, offset: int, limit: int) -> list[Region]:
        """The batmap header and map of blktap, right after the BAT's padding, when present."""
        if self.footer.creator_app != b"tap\0" or self.footer.creator_version < _TAP_BATMAP_FROM:
            return []
        if offset + SECTOR > limit:
            return []
        raw = self.file.pread_exact(offset, SECTOR, "batmap header")
        batmap = parse_batmap_header(raw, self.path)
        if batmap is None:
            return []
        if batmap.keyhash_set:
            raise UnsupportedImageError(
                self.path, "blktap batmap keyhash is set: the image is encrypted by tapdisk"
            )
        start = batmap.batmap_offset
        end = start + batmap.batmap_size * SECTOR
        if end > limit:
            raise CorruptMetadataError(
                self.path,
                f"blktap batmap of {batmap.batmap_size} sectors at offset {start} runs past "
                f"the end of data at {limit}",
            )
        return [Region(offset, offset + SECTOR, "batmap header"), Region(start, end, "batmap")]

    def _scan_bat(self) -> None:
        """Check every allocated block as the BAT streams by, and find where data ends.

        Each entry is refused at once when its block runs past the end of data or into a
        metadata region, and checked against the other blocks at once while blocks come in
        increasing order (see ``BlockStarts``). The starts kept are bounded by what the file
        can hold: more allocated entries than that is refused as soon as it is counted, so
        a table whose claims the file cannot back (a hole reads as entries of 0, not as
        unallocated) costs neither memory nor time in proportion to those claims.
        """
        limit = self.trailing_footer_offset
        span = self.block_span
        # The highest sector a block can start at and still end before the trailing footer.
        last_start = (limit - span) // SECTOR
        guard = MetadataGuard(self.metadata, span, SECTOR)
        capacity = block_capacity(self.metadata, limit, span)
        blocks = BlockStarts(span // SECTOR)
        unallocated_page = b"\xff" * BAT_PAGE_BYTES
        for page in range(self.bat_pages):
            raw = self._read_bat_bytes(page)
            if raw == unallocated_page[: len(raw)]:
                continue
            first = page * BAT_PAGE_ENTRIES
            entries = decode_entries(raw)
            allocated = _allocated(entries)
            if not allocated:
                continue
            # A page whose blocks all lie between metadata and the end (the common case) is
            # cleared as a whole; otherwise its entries are looked at one by one.
            low, high = min(allocated), max(allocated)
            if high > last_start or guard.touches(low, high):
                self._check_entries(first, entries, last_start, guard)
            kept = len(blocks)
            pair = blocks.add(allocated)
            if pair is not None:
                self._blocks_overlap(pair)
            if len(blocks) > capacity:
                index = [i for i, e in enumerate(entries, first) if e != UNALLOCATED][
                    capacity - kept
                ]
                raise CorruptMetadataError(
                    self.path,
                    f"BAT entry {index} = sector {entries[index - first]} is allocated block "
                    f"{capacity + 1}, but {limit} bytes of data hold at most {capacity} blocks "
                    f"of {span} bytes beside the metadata: blocks overlap",
                )
        pair = blocks.finish()
        if pair is not None:
            self._blocks_overlap(pair)
        self.data_end = 0 if blocks.highest < 0 else blocks.highest * SECTOR + span
        self.allocated_blocks = len(blocks)
        free = max(self.reserved[-1].end, self.data_end, self.trailing_footer_offset)
        self.next_free = -(-free // SECTOR) * SECTOR

    def _check_entries(
        self, first: int, entries: array[int], last_start: int, guard: MetadataGuard
    ) -> None:
        """Refuse the first block of ``entries`` that runs past the end of data or into metadata.

        ``entries`` are BAT entries ``first`` on, read from the table.
        """
        span = self.block_span
        for index, entry in enumerate(entries, first):
            if entry == UNALLOCATED:
                continue
            if entry > last_start:
                self._block_past_end(
                    index, entry, entry * SECTOR + span, self.trailing_footer_offset
                )
            region = guard.region_over(entry)
            if region is not None:
                start = entry * SECTOR
                raise CorruptMetadataError(
                    self.path,
                    f"BAT entry {index} = sector {entry}: block at {start}..{start + span} "
                    f"overlaps the {region.describe()}",
                )

    def _block_past_end(self, index: int, entry: int, end: int, limit: int) -> None:
        start = entry * SECTOR
        if self.trailing_footer_length:
            raise CorruptMetadataError(
                self.path,
                f"BAT entry {index} = sector {entry}: block at offset {start} ends at {end}, "
                f"beyond the end of data at {limit}",
            )
        raise TruncatedImageError(
            self.path,
            f"file is truncated: block {index} at offset {start} ends at {end} but the file "
            f"ends at {limit} and its trailing footer is missing",
        )

    def _blocks_overlap(self, pair: tuple[int, int]) -> None:
        span = self.block_span // SECTOR
        raise CorruptMetadataError(
            self.path,
            f"BAT entries at sectors {pair[0]} and {pair[1]} overlap (a block spans {span} "
            "sectors)",
        )

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

    def write_problem(self) -> Notice | None:
        """Why writing to this image would be unsafe, or ``None`` when it is safe."""
        if self.footer.saved_state:
            return Notice(
                "saved-state",
                "footer saved state is set: a Virtual PC virtual machine was saved with this "
                "disk, and writing would make its saved memory disagree with the disk",
            )
        if self.kind == DiskType.FIXED:
            return None
        if not self.trailing_footer_length:
            return Notice(
                "trailing-footer-unusable",
                "the trailing footer is missing or damaged; only the copy at offset 0 is valid",
            )
        if not self.footer_copy_matches:
            if self.resize_interrupted():
                size = self.footer.current_size
                return Notice(
                    "interrupted-resize",
                    f"a resize to {size} bytes was interrupted between its two footer writes "
                    f"(the copy at offset 0 still has the old size); finish it: vhd resize "
                    f"{self.path} {size}",
                )
            return Notice(
                "footer-copy-differs",
                "the footer copy at offset 0 differs from the trailing footer",
            )
        return self.write_hazards[0] if self.write_hazards else None

    def resize_interrupted(self) -> bool:
        """Whether the footer copy differs from the trailing footer only in the size fields.

        That is what ``vhd resize`` leaves when it is stopped between writing the trailing
        footer and the copy at offset 0 (``image.reshape``): every reader uses the trailing
        footer, and a rerun writes the copy.
        """
        if self.kind != DiskType.DYNAMIC or self.footer_copy_matches:
            return False
        if not self.trailing_footer_length:
            return False
        try:
            copy = parse_footer(self.file.pread(0, FOOTER_SIZE), self.path)
        except ImageError:
            return False
        trailing = self.footer
        return trailing == replace(
            copy,
            current_size=trailing.current_size,
            original_size=trailing.original_size,
            geometry=trailing.geometry,
            checksum=trailing.checksum,
        )

    def commit_allocation(self, end: int) -> None:
        """Account for a new block, ending at ``end``, that its BAT entry now points at."""
        self.data_end = max(self.data_end, end)
        self.allocated_blocks += 1

    def close(self) -> None:
        """Close the host file."""
        self.file.close()


def _read_header(file: HostFile, location: FooterLocation) -> DynamicHeader:
    offset = location.footer.data_offset
    limit = location.data_limit
    if offset < SECTOR or offset % SECTOR or offset + HEADER_SIZE > limit:
        raise FormatError(
            file.path,
            f"footer data offset {offset} does not point at a dynamic header inside the file "
            f"(expected a multiple of 512 from 512 to {limit - HEADER_SIZE})",
        )
    raw = file.pread_exact(offset, HEADER_SIZE, "dynamic header")
    return parse_dynamic_header(raw, file.path)


def _allocated(entries: array[int]) -> array[int]:
    """The entries that point at blocks, in BAT order."""
    if UNALLOCATED not in entries:
        return entries
    return array("I", [entry for entry in entries if entry != UNALLOCATED])
