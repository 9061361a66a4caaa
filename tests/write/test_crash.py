"""Crashes: the daemon killed with SIGKILL at every step of a flush and of a block allocation
(crash points, see vhdfs.faults), and at random moments under a write load.

Afterwards the image must open in vhdfs, qemu-img and vhdimount, ``vhd check`` must find
nothing worse than leaked space, every write acknowledged by a completed fsync must read back
intact, and every other sector must hold either its old or its new contents.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.crashes import (
    SIZE,
    MiB,
    checked_contents,
    kill_under_load,
    make_image,
    usable_again,
)
from tests.support.images import pattern, run
from tests.support.mounting import Mount, read_with_vhdimount

pytestmark = pytest.mark.fuse

# Phase 1 is written, fsynced and unmounted cleanly; phase 2 is being flushed when the crash
# comes. Both mix new blocks, existing blocks and partial sectors; all of it 4 KiB aligned
# except one write, so vhdimount's view can be compared too (libvhdi misreads partial bitmap
# bytes).
PHASE1 = [(0, 64 * 1024), (3 * MiB, 12 * 1024), (9 * MiB + 4096, 2 * MiB)]
PHASE2 = [(32 * 1024, 64 * 1024), (5 * MiB, 8192), (9 * MiB, 3 * MiB), (14 * MiB, 4096)]
PHASE2_UNALIGNED = (3 * MiB + 100, 300)


def _write(fd: int, writes: list[tuple[int, int]], seed: int, model: bytearray) -> None:
    for number, (offset, length) in enumerate(writes):
        data = pattern(seed + number, length)
        os.pwrite(fd, data, offset)
        model[offset : offset + length] = data


def _verify_after_crash(
    image: Path, tmp_path: Path, durable: bytearray, maybe: bytearray, mount: Callable[..., Mount]
) -> None:
    """The image is valid everywhere; ``durable`` is what must be there, ``maybe`` the other
    acceptable contents of each sector (the unsynced writes)."""
    ours = checked_contents(image, mount)
    for sector in range(0, SIZE, 512):
        now = ours[sector : sector + 512]
        assert now in (durable[sector : sector + 512], maybe[sector : sector + 512]), sector
    info = run(["qemu-img", "info", "-f", "vpc", "--output=json", image])
    assert f'"virtual-size": {SIZE}' in info
    vhdi = tmp_path / "vhdi"
    vhdi.mkdir(exist_ok=True)
    theirs = read_with_vhdimount(str(image), str(vhdi))
    # Where nothing unsynced was written, every reader must show the synced data.
    for sector in range(0, SIZE, 512):
        if durable[sector : sector + 512] == maybe[sector : sector + 512]:
            assert theirs[sector : sector + 512] == durable[sector : sector + 512], sector


CRASH_POINTS = [
    ("flush-data-written", 1),
    ("alloc-footer-written", 1),
    ("alloc-footer-written", 2),
    ("alloc-block-written", 2),
    ("flush-data-synced", 1),
    ("flush-bitmaps-written", 1),
    ("flush-bat-written", 1),
]


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize(("point", "count"), CRASH_POINTS)
def test_crash_inside_a_flush(
    kind: str, point: str, count: int, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image, model = make_image(tmp_path / "images", kind)
    m = mount([image])
    fd = os.open(m.raw(image.stem + ".raw"), os.O_WRONLY)
    _write(fd, PHASE1, 10, model)
    os.fsync(fd)
    os.close(fd)
    assert m.stop() == 0
    durable = bytearray(model)
    crashing = mount(
        [image],
        foreground=True,
        options=["writeback=3600"],
        env={"VHDFS_CRASH_AT": f"{point}:{count}"},
    )
    # Writes into new blocks stay in memory until the fsync, whose flush meets the crash point
    # (writes of sectors the image already holds go straight in).
    fd = os.open(crashing.raw(image.stem + ".raw"), os.O_WRONLY)
    _write(fd, [*PHASE2, PHASE2_UNALIGNED], 20, model)
    with pytest.raises(OSError, match=r"Software caused connection abort|not connected"):
        os.fsync(fd)
    with pytest.raises(OSError, match=r"Software caused connection abort|not connected"):
        os.close(fd)
    assert crashing.wait_exited() == -signal.SIGKILL
    crashing.cleanup()
    _verify_after_crash(image, tmp_path, durable, model, mount)
    usable_again(image, mount)


@pytest.mark.parametrize("seed", range(4))
def test_random_kill_under_load(seed: int, tmp_path: Path, mount: Callable[..., Mount]) -> None:
    kill_under_load(tmp_path, ["dynamic", "differencing"][seed % 2], seed, mount)
