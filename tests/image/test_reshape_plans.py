"""Compaction plans on random layouts, executed step by step with a kill at every step.

Hypothesis draws a dynamic image: blocks in any order, holes of any size (so some moves must
bounce), all-zero blocks, the BAT before or after the blocks. The plan is executed on an
in-memory copy of the file; after every step the copy (as a kill -9 would leave it) must
open in vhdfs and read exactly as before; after the last one the file holds no leaked space.
And what a power cut keeps is only what was synced: the order of syncs is checked too.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.craft import Item, craft
from vhdfs.disk.virtual import DiskOptions, open_disk
from vhdfs.format.layout import SECTOR
from vhdfs.image.check import check_chain
from vhdfs.image.reshape import plan_compact
from vhdfs.image.steps import (
    CopyRange,
    PatchBatSector,
    Step,
    Sync,
    Truncate,
    WriteFooter,
    WriteMeta,
)
from vhdfs.image.vhd import VhdImage
from vhdfs.tools.shape import shape_of

BLOCK = 4096


def _apply(step: Step, file: bytearray) -> None:
    def write(offset: int, data: bytes) -> None:
        if len(file) < offset + len(data):
            file.extend(bytes(offset + len(data) - len(file)))
        file[offset : offset + len(data)] = data

    match step:
        case CopyRange(source, target, length):
            write(target, bytes(file[source : source + length]))
        case WriteMeta(offset, raw, _) | WriteFooter(offset, raw):
            write(offset, raw)
        case PatchBatSector(sector, patches):
            for within, value in patches:
                write(sector * SECTOR + within, value)
        case Truncate(size):
            del file[size:]


def _read(path: Path) -> bytes:
    async def read() -> bytes:
        disk = open_disk(str(path), DiskOptions(read_only=True))
        try:
            return bytes(await disk.read(0, disk.size))
        finally:
            await disk.aclose()

    return trio.run(read)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Item], dict[int, bytes]]:
    count = draw(st.integers(1, 8))
    blocks = draw(st.permutations(range(12)))[:count]
    rng = random.Random(draw(st.integers(0, 2**32)))
    items: list[Item] = ["header"] if draw(st.booleans()) else ["header", "bat"]
    data = {}
    for block in blocks:
        if draw(st.booleans()):
            items.append(("gap", draw(st.sampled_from([512, 4096, BLOCK, BLOCK + 512, 3 * BLOCK]))))
        items.append(("block", block))
        data[block] = bytes(BLOCK) if draw(st.integers(0, 3)) == 0 else rng.randbytes(BLOCK)
    if "bat" not in items:
        items.append("bat")  # after the blocks
    return items, data


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(layout=layouts(), aligned=st.booleans())
def test_compaction_is_valid_after_every_step(
    layout: tuple[list[Item], dict[int, bytes]], aligned: bool, tmp_path_factory
) -> None:
    items, data = layout
    folder = tmp_path_factory.mktemp("compact")
    image = folder / "d.vhd"
    craft(image, size=12 * BLOCK, block_size=BLOCK, layout=items, data=data, align_data=aligned)
    expected = _read(image)
    opened = VhdImage.open(str(image))
    try:
        shape = shape_of(opened)
    finally:
        opened.close()
    zero = {block for block, payload in data.items() if payload == bytes(BLOCK)}
    plan = plan_compact(shape, zero)
    # A power cut keeps only what was synced: nothing points at a copy, and the file is not
    # cut behind a footer, before a sync.
    unsynced: set[type] = set()
    for step in plan.steps:
        if isinstance(step, Sync):
            unsynced.clear()
        elif isinstance(step, CopyRange | WriteFooter):
            unsynced.add(type(step))
        elif isinstance(step, PatchBatSector):
            assert CopyRange not in unsynced
        elif isinstance(step, Truncate):
            assert WriteFooter not in unsynced
    file = bytearray(image.read_bytes())
    state = folder / "state.vhd"
    state.write_bytes(file)
    for step in plan.steps:
        _apply(step, file)
        state.write_bytes(file)
        assert _read(state) == expected, f"after {step}"
    assert len(file) == plan.new_size
    report = check_chain(str(state))
    assert report.exit_code == 0
    if items.index("bat") < items.index(next(i for i in items if i[0] == "block")):
        # (Blocks move, the BAT does not: space before a BAT that follows them may stay.)
        assert report.leaked_bytes == 0, [str(f) for f in report.findings]
