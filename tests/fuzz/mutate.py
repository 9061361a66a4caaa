"""Field-aware mutations of VHD files, drawn from any source of integers.

A mutation knows the format: it sets one footer or dynamic header field, one locator entry or
its data, one BAT entry, bits of a block bitmap, batmap fields, or it truncates, extends or
swaps a file, and it recomputes the checksums most of the time, so that parsing goes past the
checksum checks into the deeper rules. Values are drawn from the boundaries that matter
(0, 1, 511, 512, the file size, 2^32 - 1, 2^63...) or at random.

``Draw`` abstracts the source of choices: ``random.Random`` for the long runs and hypothesis's
``data.draw`` for the test suite (which then shrinks a failure to its simplest form). Plain
``struct`` only: the fuzzer shares no code with what it tests.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

SECTOR = 512

#: ``draw(lo, hi)`` returns an integer in ``[lo, hi]``.
Draw = Callable[[int, int], int]

# (offset, size) of the fields of the footer and of the dynamic header.
FOOTER_FIELDS = [
    (0, 8), (8, 4), (12, 4), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4), (40, 8), (48, 8),
    (56, 2), (58, 1), (59, 1), (60, 4), (64, 4), (68, 16), (84, 1), (85, 1),
]  # fmt: skip
HEADER_FIELDS = [
    (0, 8), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4), (40, 16), (56, 4), (64, 512),
]  # fmt: skip
LOCATOR_FIELDS = [(0, 4), (4, 4), (8, 4), (12, 4), (16, 8)]
PLATFORM_CODES = [b"W2ru", b"W2ku", b"Wi2r", b"Wi2k", b"MacX", b"Mac ", b"\0\0\0\0", b"XXXX"]
LOCATOR_TEXTS = [
    b"file:///tmp/x%00y.vhd",
    b"file://localhost/dev/zero",
    b"file://./fifo",
    b"file://../../../../../../etc/passwd",
    b"file://%2e%2e/base.vhd",
    ".\\fifo".encode("utf-16-le"),
    "\\\\server\\share\\base.vhd".encode("utf-16-le"),
    "C:\\\x1b[2J\nevil.vhd".encode("utf-16-le"),
    "\udcff".encode("utf-16-le", "surrogatepass"),
    b"\xff\xfe\xfd",
    b"/proc/self/fd/0",
    b"",
    b"\0" * 40,
]


@dataclass
class Files:
    """The files of one input (leaf first in ``order``) being mutated, with what was done."""

    #: File contents by path; a file becomes a bytearray when first mutated.
    data: dict[str, bytes | bytearray]
    leaf: str
    done: list[str]
    #: Files to create as something else than a regular file: ``"fifo"`` or ``"directory"``.
    special: dict[str, str] = field(default_factory=dict)


def _interesting(draw: Draw, size: int, file_size: int) -> int:
    """A value for a field of ``size`` bytes, boundaries first."""
    top = (1 << (8 * size)) - 1
    candidates = [
        0, 1, 2, 511, 512, 513, 1024, 1536, 4096, 65535, 1 << 20, 1 << 31,
        file_size - 512, file_size - 511, file_size, file_size + 512, file_size * 2,
        0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, (1 << 63) - 512, (1 << 63) - 1, 1 << 63, top, top - 1,
    ]  # fmt: skip
    choice = draw(0, len(candidates))
    if choice == len(candidates):
        return draw(0, top)
    return candidates[choice] & top


def _checksum(data: bytes | bytearray, offset: int) -> int:
    total = sum(data) - sum(data[offset : offset + 4])
    return ~total & 0xFFFFFFFF


class Layout:
    """Where the structures of one file are, as far as its bytes say (best effort)."""

    def __init__(self, raw: bytearray) -> None:
        self.raw = raw
        size = len(raw)
        self.footer_at = max(0, size - (511 if size % SECTOR == 511 else SECTOR))
        footer = bytes(raw[self.footer_at : self.footer_at + SECTOR]).ljust(SECTOR, b"\0")
        self.dynamic = len(raw) >= 2048 and footer[60:64] in (b"\0\0\0\3", b"\0\0\0\4")
        self.header_at = struct.unpack_from(">Q", footer, 16)[0] if self.dynamic else 0
        self.table_at = self.entries = self.block_size = 0
        if self.dynamic and self.header_at + 1024 <= size:
            header = raw[self.header_at : self.header_at + 1024]
            self.table_at, _, self.entries, self.block_size = struct.unpack_from(
                ">QIII", header, 16
            )
        else:
            self.dynamic = False

    def bat_entries(self) -> list[tuple[int, int]]:
        """``(position of the entry, its value)`` for the entries inside the file."""
        out = []
        for index in range(min(self.entries, 4096)):
            at = self.table_at + 4 * index
            if at + 4 > len(self.raw):
                break
            out.append((at, struct.unpack_from(">I", self.raw, at)[0]))
        return out

    def fix_footers(self) -> None:
        """Recompute the checksums of both footers (the copy only of a dynamic image)."""
        for at in (self.footer_at, 0) if self.dynamic else (self.footer_at,):
            footer = self.raw[at : at + SECTOR]
            if len(footer) >= 68:
                struct.pack_into(
                    ">I", self.raw, at + 64, _checksum(footer.ljust(SECTOR, b"\0"), 64)
                )

    def fix_header(self) -> None:
        if self.dynamic:
            header = self.raw[self.header_at : self.header_at + 1024]
            struct.pack_into(">I", self.raw, self.header_at + 36, _checksum(header, 36))


def mutate(draw: Draw, files: Files) -> None:
    """Apply one mutation to ``files`` (recorded in ``files.done``)."""
    names = sorted(files.data)
    name = names[draw(0, len(names) - 1)] if draw(0, 3) == 0 else files.leaf
    raw = files.data[name] = bytearray(files.data[name])
    layout = Layout(raw)
    kind = draw(0, 11)
    fix = draw(0, 9) != 0  # most of the time, so parsing goes past the checksums
    if kind <= 1:
        where = [layout.footer_at] + ([0] if layout.dynamic and draw(0, 1) else [])
        offset, size = FOOTER_FIELDS[draw(0, len(FOOTER_FIELDS) - 1)]
        value = _interesting(draw, size, len(raw))
        for at in where:
            _put(raw, at + offset, size, value)
        files.done.append(f"{name}: footer@{where} field {offset} = {value:#x}")
        if fix:
            layout.fix_footers()
    elif kind <= 3 and layout.dynamic:
        offset, size = HEADER_FIELDS[draw(0, len(HEADER_FIELDS) - 1)]
        value = _interesting(draw, min(size, 8), len(raw))
        if size > 8:  # the parent name: UTF-16BE text of any kind
            text = LOCATOR_TEXTS[draw(0, len(LOCATOR_TEXTS) - 1)].ljust(size, b"\0")[:size]
            raw[layout.header_at + offset : layout.header_at + offset + size] = text
        else:
            _put(raw, layout.header_at + offset, size, value)
        files.done.append(f"{name}: header field {offset} = {value:#x}")
        if fix:
            layout.fix_header()
    elif kind <= 5 and layout.dynamic:
        _mutate_locator(draw, files, name, layout)
        if fix:
            layout.fix_header()
    elif kind <= 7 and layout.dynamic and layout.entries:
        _mutate_bat(draw, files, name, layout)
    elif kind == 8 and layout.dynamic:
        _mutate_bitmap(draw, files, name, layout)
    elif kind == 9:
        _resize(draw, files, name)
    elif kind == 10 and len(names) > 1:
        # A parent replaced by another file of the input (a wrong id, or a loop), or by
        # something that is no file at all.
        choice = draw(0, 3)
        if choice >= 2:
            files.special[name] = "fifo" if choice == 2 else "directory"
            files.done.append(f"{name}: replaced by a {files.special[name]}")
        else:
            other = names[draw(0, len(names) - 1)]
            files.data[name] = bytearray(files.data[other])
            files.done.append(f"{name}: replaced by {other}")
    else:
        at = draw(0, max(0, min(len(raw), 8192) - 1))
        raw[at : at + 1] = bytes([draw(0, 255)])
        files.done.append(f"{name}: byte {at} set")
        if fix:
            layout.fix_footers()
            layout.fix_header()


def _put(raw: bytearray, at: int, size: int, value: int) -> None:
    if at >= 0 and at + size <= len(raw):
        raw[at : at + size] = value.to_bytes(size, "big")


def _mutate_locator(draw: Draw, files: Files, name: str, layout: Layout) -> None:
    raw = layout.raw
    slot = draw(0, 7)
    entry_at = layout.header_at + 576 + 24 * slot
    if entry_at + 24 > len(raw):
        return
    choice = draw(0, 2)
    if choice == 0:
        code = PLATFORM_CODES[draw(0, len(PLATFORM_CODES) - 1)]
        raw[entry_at : entry_at + 4] = code
        files.done.append(f"{name}: locator {slot} code {code!r}")
    elif choice == 1:
        offset, size = LOCATOR_FIELDS[draw(1, len(LOCATOR_FIELDS) - 1)]
        value = _interesting(draw, size, len(raw))
        _put(raw, entry_at + offset, size, value)
        files.done.append(f"{name}: locator {slot} field {offset} = {value:#x}")
    else:
        text = LOCATOR_TEXTS[draw(0, len(LOCATOR_TEXTS) - 1)]
        _space, _length, _reserved, data_at = struct.unpack_from(">IIIQ", raw, entry_at + 4)
        if data_at + len(text) <= len(raw):
            raw[data_at : data_at + len(text)] = text
            struct.pack_into(">I", raw, entry_at + 8, len(text))
            files.done.append(f"{name}: locator {slot} data {text!r}")


def _mutate_bat(draw: Draw, files: Files, name: str, layout: Layout) -> None:
    entries = layout.bat_entries()
    if not entries:
        return
    at, _ = entries[draw(0, len(entries) - 1)]
    allocated = [value for _, value in entries if value != 0xFFFFFFFF]
    choice = draw(0, 3)
    if choice == 0 and allocated:
        value = allocated[draw(0, len(allocated) - 1)]  # two entries, one block
    elif choice == 1 and allocated:
        value = (allocated[draw(0, len(allocated) - 1)] + draw(-9, 9)) & 0xFFFFFFFF
    elif choice == 2:
        value = _interesting(draw, 4, len(layout.raw)) // SECTOR
    else:
        value = _interesting(draw, 4, len(layout.raw))
    struct.pack_into(">I", layout.raw, at, value)
    files.done.append(f"{name}: BAT entry at {at} = {value:#x}")


def _mutate_bitmap(draw: Draw, files: Files, name: str, layout: Layout) -> None:
    allocated = [value for _, value in layout.bat_entries() if value != 0xFFFFFFFF]
    if not allocated:
        return
    at = allocated[draw(0, len(allocated) - 1)] * SECTOR + draw(0, 63)
    if at < len(layout.raw):
        layout.raw[at] = draw(0, 255)
        files.done.append(f"{name}: bitmap byte {at} = {layout.raw[at]:#x}")


def _resize(draw: Draw, files: Files, name: str) -> None:
    raw = files.data[name]
    assert isinstance(raw, bytearray)
    choice = draw(0, 3)
    if choice == 0:
        cut = draw(0, len(raw))
        del raw[cut:]
        files.done.append(f"{name}: truncated to {cut}")
    elif choice == 1:
        del raw[-1:]
        files.done.append(f"{name}: last byte dropped")
    elif choice == 2:
        extra = draw(1, 3 * SECTOR)
        raw.extend(bytes([draw(0, 255)]) * extra)
        files.done.append(f"{name}: {extra} bytes appended")
    else:
        raw[-SECTOR:] = bytes(min(SECTOR, len(raw)))
        files.done.append(f"{name}: trailing footer zeroed")
