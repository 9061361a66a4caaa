"""Plans of ``vhdfs.image.commit``, checked without a file.

Hypothesis draws an image (kind, block size, a BAT that may be unaligned, allocated blocks
with random bitmaps) and dirty runs; the plan's steps must respect the order rules of the
module docstring, and executing them on an in-memory copy of the image must leave, after
every prefix (a kill -9 at that step), an image whose every sector reads as its old or its
new contents, in a reader that honours bitmaps and (dynamic images) in one that ignores them,
as QEMU does (the two must agree: a clear bit holds zeros on disk). After the whole plan
every sector reads as new.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from vhdfs.format.bitmap import SectorBitmap, bitmap_bytes
from vhdfs.format.layout import DATA_ALIGNMENT, FOOTER_SIZE, SECTOR, UNALLOCATED, DiskType
from vhdfs.image.commit import plan_flush
from vhdfs.image.steps import (
    Commit,
    CrashPoint,
    PatchBatSector,
    Reserve,
    Step,
    Sync,
    Target,
    WriteBitmap,
    WriteData,
    WriteFooter,
)

BLOCKS = 6
FOOTER = b"conectix" + bytes(FOOTER_SIZE - 8)


def parent_sector(sector: int) -> bytes:
    """What the (imaginary) parent of a differencing image holds at ``sector``."""
    return struct.pack(">I", sector | 0x80000000) * (SECTOR // 4)


@dataclass
class Model:
    """An image held in memory, with what it was made of."""

    target: Target
    file: bytearray
    entries: list[int]

    @property
    def spb(self) -> int:
        return self.target.block_size // SECTOR

    # -- BlockMeta, for the planner -----------------------------------------------------

    def bat_entry(self, layer: int, block: int) -> int:
        return self.entries[block]

    def bitmap(self, layer: int, block: int, entry: int) -> SectorBitmap:
        raw = self.file[entry * SECTOR : entry * SECTOR + self.target.bitmap_size]
        return SectorBitmap(bytes(raw), self.spb)

    # -- an independent reader ----------------------------------------------------------

    def read(self, file: bytearray, sector: int, *, honour_bitmap: bool = True) -> bytes:
        table = self.target.table_offset
        block, within = divmod(sector, self.spb)
        entry = struct.unpack_from(">I", file, table + 4 * block)[0]
        if entry == UNALLOCATED:
            return self._absent(sector)
        bit = file[entry * SECTOR + within // 8] & (0x80 >> within % 8)
        if honour_bitmap and not bit:
            return self._absent(sector)
        at = entry * SECTOR + self.target.bitmap_size + within * SECTOR
        return bytes(file[at : at + SECTOR]).ljust(SECTOR, b"\0")

    def _absent(self, sector: int) -> bytes:
        if self.target.kind == DiskType.DIFFERENCING:
            return parent_sector(sector)
        return bytes(SECTOR)


@st.composite
def models(draw: st.DrawFn) -> Model:
    kind = draw(st.sampled_from([DiskType.DYNAMIC, DiskType.DIFFERENCING]))
    block_size = draw(st.sampled_from([4096, 16384, 65536]))
    bitmap_size = bitmap_bytes(block_size // SECTOR)
    table_offset = 1536 + draw(st.sampled_from([0, 0, 4, 508]))  # possibly misaligned
    file = bytearray(2048 + 2 * SECTOR)
    entries = [UNALLOCATED] * BLOCKS
    rng = random.Random(draw(st.integers(0, 2**32)))
    position = len(file)
    for block in draw(st.lists(st.integers(0, BLOCKS - 1), unique=True, max_size=BLOCKS)):
        data_at = -(-(position + bitmap_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT
        start = data_at - bitmap_size
        bits = [rng.random() < 0.6 for _ in range(block_size // SECTOR)]
        raw_bitmap = bytearray(bitmap_size)
        data = bytearray(block_size)
        for sector, present in enumerate(bits):
            if present:  # a clear bit holds zeros on disk (the spec's rule)
                raw_bitmap[sector // 8] |= 0x80 >> sector % 8
                data[sector * SECTOR : (sector + 1) * SECTOR] = rng.randbytes(SECTOR)
        file.extend(bytes(data_at + block_size - len(file)))
        file[start:data_at] = raw_bitmap
        file[data_at : data_at + block_size] = data
        entries[block] = start // SECTOR
        position = data_at + block_size
    table = b"".join(struct.pack(">I", e) for e in entries)
    file[table_offset : table_offset + len(table)] = table
    footer_at = len(file)
    file.extend(FOOTER)
    target = Target(
        kind=kind,
        block_size=block_size,
        bitmap_size=bitmap_size,
        table_offset=table_offset,
        footer=FOOTER,
        file_size=len(file),
        next_free=footer_at,
    )
    return Model(target, file, entries)


@st.composite
def dirty_runs(draw: st.DrawFn, block_size: int) -> list[tuple[int, bytes]]:
    sectors = BLOCKS * block_size // SECTOR
    starts = sorted(draw(st.lists(st.integers(0, sectors - 1), unique=True, max_size=8)))
    runs = []
    for i, first in enumerate(starts):
        limit = (starts[i + 1] if i + 1 < len(starts) else sectors) - first
        count = draw(st.integers(1, min(limit, 3 * block_size // SECTOR)))
        zeros = draw(st.booleans())
        size = count * SECTOR
        data = bytes(size) if zeros else draw(st.binary(min_size=size, max_size=size))
        runs.append((first * SECTOR, data))
    # Neighbouring runs are one run, as DirtyPages yields them.
    merged: list[tuple[int, bytes]] = []
    for offset, data in runs:
        if merged and merged[-1][0] + len(merged[-1][1]) == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + data)
        else:
            merged.append((offset, data))
    return merged


def apply(step: Step, file: bytearray) -> None:
    """What an executor does to the file (in-memory bookkeeping steps change nothing)."""

    def write(offset: int, data: bytes) -> None:
        if len(file) < offset + len(data):
            file.extend(bytes(offset + len(data) - len(file)))
        file[offset : offset + len(data)] = data

    match step:
        case WriteData(offset, chunks):
            write(offset, b"".join(chunks))
        case WriteBitmap(_, offset, bitmap, _):
            write(offset, bytes(bitmap.raw))
        case WriteFooter(offset, raw):
            write(offset, raw)
        case PatchBatSector(sector, patches):
            for within, value in patches:
                write(sector * SECTOR + within, value)


def check_order(model: Model, steps: list[Step], durable: bool) -> None:
    """The order rules, step by step."""
    synced_upto = -1  # index of the last Sync
    dirty_blocks: dict[int, int] = {}  # file offset of a block start -> last write index
    block_of = {}
    for step in steps:
        if isinstance(step, Reserve | Commit):
            block_of[step.allocation.bitmap_offset] = step.allocation
    span = model.target.bitmap_size + model.target.block_size

    def start_of(offset: int) -> int:
        for entry in model.entries:
            if entry != UNALLOCATED and entry * SECTOR <= offset < entry * SECTOR + span:
                return entry * SECTOR
        for start in block_of:
            if start <= offset < start + span:
                return start
        raise AssertionError(f"write at {offset} lands outside every block")

    for index, step in enumerate(steps):
        match step:
            case Sync():
                synced_upto = index
            case WriteData(offset, chunks):
                start = start_of(offset)
                end = offset + sum(len(c) for c in chunks)
                assert end <= start + span
                assert offset >= start + model.target.bitmap_size, "data over a bitmap"
                dirty_blocks[start] = index
            case WriteBitmap(_, offset, _, cached):
                if cached and model.target.kind == DiskType.DIFFERENCING:
                    # New bits over data that must already be durable.
                    assert dirty_blocks.get(offset, -1) < synced_upto
                dirty_blocks[offset] = index
            case PatchBatSector():
                # Every new block a BAT entry may now reach was written before the last sync.
                assert all(dirty_blocks.get(start, -1) < synced_upto for start in block_of)
    if durable:
        writes = [i for i, s in enumerate(steps) if not isinstance(s, CrashPoint | Commit)]
        assert isinstance(steps[writes[-1]], Sync)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_plans_keep_every_sector_old_or_new(data: st.DataObject) -> None:
    model = data.draw(models())
    runs = data.draw(dirty_runs(model.target.block_size))
    durable = data.draw(st.booleans())
    spb = model.target.block_size // SECTOR
    sectors = BLOCKS * spb
    old = [model.read(model.file, s) for s in range(sectors)]
    new = list(old)
    for offset, payload in runs:
        for i in range(0, len(payload), SECTOR):
            new[offset // SECTOR + i // SECTOR] = payload[i : i + SECTOR]
    steps = plan_flush(
        model.target,
        [(offset, [memoryview(payload)]) for offset, payload in runs],
        model,
        {},
        durable=durable,
    )
    check_order(model, steps, durable)
    file = bytearray(model.file)
    dynamic = model.target.kind == DiskType.DYNAMIC
    for step in [None, *steps]:
        if step is not None:
            apply(step, file)
        # A kill -9 here: the file must end in the footer and read old or new everywhere.
        assert bytes(file[-FOOTER_SIZE:]) == FOOTER
        for sector in range(sectors):
            got = model.read(file, sector)
            assert got in (old[sector], new[sector]), f"sector {sector} after {step}"
            if dynamic:
                # A clear bit means zeros on disk: QEMU, which ignores bitmaps, reads the same.
                raw = model.read(file, sector, honour_bitmap=False)
                assert raw == got, f"QEMU's view of sector {sector} after {step}"
    assert [model.read(file, s) for s in range(sectors)] == new


def test_zeros_into_a_hole_of_a_dynamic_image_plan_nothing() -> None:
    target = Target(DiskType.DYNAMIC, 4096, 512, 1536, FOOTER, 8192, 7680)
    meta = Model(target, bytearray(8192), [UNALLOCATED] * BLOCKS)
    steps = plan_flush(target, [(4096, [memoryview(bytes(8192))])], meta, {}, durable=False)
    assert all(isinstance(step, CrashPoint) for step in steps)


def test_fixed_images_write_in_place() -> None:
    target = Target(DiskType.FIXED, 0, 0, 0, FOOTER, 1 << 20, 1 << 20)
    runs = [(0, [memoryview(b"a" * 512)]), (4096, [memoryview(b"b" * 1024)])]
    steps = plan_flush(target, runs, Model(target, bytearray(), []), {}, durable=True)
    assert steps == [
        WriteData(0, runs[0][1]),
        WriteData(4096, runs[1][1]),
        CrashPoint("flush-data-written"),
        Sync(),
    ]
