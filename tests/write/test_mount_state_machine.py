"""A hypothesis state machine over real mounts: writes, reads, fsyncs and remounts of fixed,
dynamic and differencing images against an in-memory model of the disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.support.images import SECTOR, Layer, build_chain, pattern
from tests.support.mounting import Mount
from vhdfs.image.check import check_chain
from vhdfs.image.create import create_differencing

pytestmark = pytest.mark.fuse

SIZE = 3 * 1024 * 1024 + 3 * SECTOR


class MountedDisk(RuleBasedStateMachine):
    """One image mounted read-write; the model is what its raw file must contain."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.folder = Path(self.tmp.name)
        self.mount: Mount | None = None
        self.fd = -1
        self.writes = 0

    @initialize(
        kind=st.sampled_from(["fixed", "dynamic", "differencing"]),
        block_size=st.sampled_from([4096, 64 << 10, 2 << 20]),
        options=st.sampled_from([[], ["writeback=0"], ["dirty_limit=1M"]]),
    )
    def create(self, kind: str, block_size: int, options: list[str]) -> None:
        if kind == "differencing":
            built = build_chain(self.folder, SIZE, [Layer(writes=[(3, 500), (5000, 17)])])
            self.image = self.folder / "child.vhd"
            create_differencing(str(self.image), str(built.leaf), block_size)
        else:
            built = build_chain(self.folder, SIZE, [Layer(kind=kind, block_size=block_size)])
            self.image = built.leaf
        self.model = built.expected
        self.options = options
        self._mount()

    def _mount(self) -> None:
        mountpoint = self.folder / "mnt"
        mountpoint.mkdir(exist_ok=True)
        self.mount = Mount([str(self.image)], str(mountpoint), self.options).start()
        self.fd = os.open(self.mount.raw(self.image.stem + ".raw"), os.O_RDWR)

    def _unmount(self) -> None:
        os.close(self.fd)
        assert self.mount is not None
        assert self.mount.stop() == 0
        self.mount = None

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 200_000), zeros=st.booleans())
    def write(self, offset: int, length: int, zeros: bool) -> None:
        self.writes += 1
        data = bytes(length) if zeros else pattern(self.writes, length)
        written = os.pwrite(self.fd, data, offset)
        assert written == min(length, SIZE - offset)
        self.model[offset : offset + written] = data[:written]

    @rule(offset=st.integers(0, SIZE + 100), length=st.integers(0, 300_000))
    def read(self, offset: int, length: int) -> None:
        assert os.pread(self.fd, length, offset) == bytes(self.model[offset : offset + length])

    @rule()
    def fsync(self) -> None:
        os.fsync(self.fd)

    @rule()
    def remount(self) -> None:
        self._unmount()
        report = check_chain(str(self.image))
        assert report.exit_code == 0, [str(f) for f in report.findings]
        self._mount()

    @invariant()
    def size_is_fixed(self) -> None:
        if self.mount is not None:
            assert os.fstat(self.fd).st_size == SIZE

    def teardown(self) -> None:
        try:
            if self.mount is not None:
                self._unmount()
                # Everything written, fsynced or not, is in the image after a clean unmount.
                check = Mount([str(self.image)], str(self.folder / "mnt"), ["ro"]).start()
                try:
                    raw = Path(check.raw(self.image.stem + ".raw")).read_bytes()
                    assert raw == bytes(self.model)
                finally:
                    assert check.stop() == 0
        finally:
            if self.mount is not None:
                self.mount.cleanup()
            self.tmp.cleanup()


MountedDisk.TestCase.settings = settings(max_examples=12, stateful_step_count=12, deadline=None)
test_mounted_disk = MountedDisk.TestCase
