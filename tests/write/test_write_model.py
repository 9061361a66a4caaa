"""Random programs of writes, reads, flushes and reopens against an in-memory model of the disk.

Hypothesis generates the whole program (so it shrinks to the shortest failing one) and it runs
in one trio loop through VirtualDisk: the image, cache and write-back layers, without a mount.
After every reopen the image must pass ``vhd check`` (leaks allowed) and read as the model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.images import SECTOR, Layer, build_chain, pattern
from vhdfs.cache.block_cache import MIN_CACHE_SIZE
from vhdfs.disk.virtual import DiskOptions, VirtualDisk, open_disk
from vhdfs.errors import NoSpaceError
from vhdfs.image.check import check_chain
from vhdfs.image.create import create_differencing

SIZE = 2 * 1024 * 1024 + 5 * SECTOR  # not a multiple of any block size
BLOCK_SIZES = [4096, 64 << 10, 512 << 10, 2 << 20]

offsets = st.one_of(
    st.integers(0, SIZE + 1000),
    st.sampled_from([0, 511, 512, 4095, 4096, 65535, 65536, SIZE - 700, SIZE - 1]),
)
operations = st.one_of(
    st.tuples(
        st.just("write"),
        offsets,
        st.integers(1, 80_000),
        st.sampled_from(["data", "zeros"]),
    ),
    st.tuples(st.just("read"), offsets, st.integers(0, 100_000)),
    st.tuples(st.just("flush"), st.booleans()),
    st.tuples(st.just("reopen")),
)


def _open(leaf: Path, interval: float, dirty_limit: int) -> VirtualDisk:
    options = DiskOptions(cache_size=MIN_CACHE_SIZE, writeback=interval, dirty_limit=dirty_limit)
    return open_disk(str(leaf), options)


async def _run_program(leaf: Path, model: bytearray, program: list[tuple], interval: float) -> None:
    disk = _open(leaf, interval, 1 << 20)
    try:
        for step, op in enumerate(program):
            if op[0] == "write":
                _, offset, length, kind = op
                data = bytes(length) if kind == "zeros" else pattern(step + 7, length)
                if offset >= SIZE:
                    with pytest.raises(NoSpaceError):
                        await disk.write(offset, data)
                    continue
                written = await disk.write(offset, data)
                assert written == min(length, SIZE - offset)
                model[offset : offset + written] = data[:written]
            elif op[0] == "read":
                _, offset, length = op
                assert bytes(await disk.read(offset, length)) == bytes(
                    model[offset : offset + length]
                )
            elif op[0] == "flush":
                await disk.flush(durable=op[1])
            else:
                await disk.aclose()
                report = check_chain(str(leaf))
                assert report.exit_code == 0, [str(f) for f in report.findings]
                assert not [f for f in report.findings if f.severity != "leak"]
                disk = _open(leaf, interval, 1 << 20)
                assert bytes(await disk.read(0, SIZE)) == bytes(model)
    finally:
        await disk.aclose()
    final = _open(leaf, interval, 1 << 20)
    try:
        assert bytes(await final.read(0, SIZE)) == bytes(model)
    finally:
        await final.aclose()


def _base(folder: Path, kind: str, block_size: int) -> tuple[Path, bytearray]:
    if kind == "differencing":
        built = build_chain(folder, SIZE, [Layer(writes=[(0, 40), (2000, 300), (4090, 10)])])
        child = folder / "child.vhd"
        create_differencing(str(child), str(built.leaf), block_size)
        return child, built.expected
    built = build_chain(folder, SIZE, [Layer(kind=kind, block_size=block_size)])
    return built.leaf, built.expected


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    kind=st.sampled_from(["fixed", "dynamic", "differencing"]),
    block_size=st.sampled_from(BLOCK_SIZES),
    interval=st.sampled_from([0.0, 30.0]),
    program=st.lists(operations, min_size=1, max_size=25),
)
def test_random_programs_match_the_model(
    kind: str, block_size: int, interval: float, program: list[tuple]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        leaf, model = _base(Path(tmp), kind, block_size)
        trio.run(_run_program, leaf, model, program, interval)
