"""Crashes: the daemon killed with SIGKILL at every step of a flush and of a block allocation
(crash points, see vhdfs.faults), and at random moments under a write load.

Afterwards the image must open in vhdfs, qemu-img and vhdimount, ``vhd check`` must find
nothing worse than leaked space, every write acknowledged by a completed fsync must read back
intact, and every other sector must hold either its old or its new contents.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain, pattern, run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command
from vhdfs.image.create import create_differencing

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = 16 * MiB

# Phase 1 is written, fsynced and unmounted cleanly; phase 2 is being flushed when the crash
# comes. Both mix new blocks, existing blocks and partial sectors; all of it 4 KiB aligned
# except one write, so vhdimount's view can be compared too (libvhdi misreads partial bitmap
# bytes).
PHASE1 = [(0, 64 * 1024), (3 * MiB, 12 * 1024), (9 * MiB + 4096, 2 * MiB)]
PHASE2 = [(32 * 1024, 64 * 1024), (5 * MiB, 8192), (9 * MiB, 3 * MiB), (14 * MiB, 4096)]
PHASE2_UNALIGNED = (3 * MiB + 100, 300)


def _image(folder: Path, kind: str) -> tuple[Path, bytearray]:
    if kind == "differencing":
        built = build_chain(folder, SIZE, [Layer(writes=[(0, 4096), (20000, 500)])])
        child = folder / "child.vhd"
        create_differencing(str(child), str(built.leaf), 512 << 10)
        return child, built.expected
    built = build_chain(folder, SIZE, [Layer(block_size=1 << 20)])
    return built.leaf, built.expected


def _write(fd: int, writes: list[tuple[int, int]], seed: int, model: bytearray) -> None:
    for number, (offset, length) in enumerate(writes):
        data = pattern(seed + number, length)
        os.pwrite(fd, data, offset)
        model[offset : offset + length] = data


def _checked_contents(image: Path, mount: Callable[..., Mount]) -> bytes:
    """``vhd check`` finds nothing worse than leaks; return the disk as vhdfs reads it.

    For a dynamic image QEMU, which ignores bitmaps and reads every allocated sector as it
    lies on disk, must read exactly the same: a sector with a clear bit holds zeros even
    right after a crash.
    """
    report = json.loads(
        subprocess.run(
            [*vhd_command(), "check", "--json", str(image)], capture_output=True, text=True
        ).stdout
    )
    assert report["exit_code"] == 0, report
    assert {f["severity"] for f in report["findings"]} <= {"leak"}, report
    m = mount([image], options=["ro"])
    ours = Path(m.raw(image.stem + ".raw")).read_bytes()
    assert m.stop() == 0
    with open(image, "rb") as f:
        f.seek(-512 + 60, os.SEEK_END)
        disk_type = int.from_bytes(f.read(4), "big")
    if disk_type == 3:  # dynamic
        qemu = image.with_suffix(".qemu.raw")
        run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, qemu])
        assert qemu.read_bytes() == ours
        qemu.unlink()
    return ours


def _verify_after_crash(
    image: Path, tmp_path: Path, durable: bytearray, maybe: bytearray, mount: Callable[..., Mount]
) -> None:
    """The image is valid everywhere; ``durable`` is what must be there, ``maybe`` the other
    acceptable contents of each sector (the unsynced writes)."""
    ours = _checked_contents(image, mount)
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


def _usable_again(image: Path, mount: Callable[..., Mount]) -> None:
    """After a crash the image takes new writes and stays clean."""
    m = mount([image])
    with open(m.raw(image.stem + ".raw"), "r+b") as f:
        f.seek(SIZE - 3 * MiB)
        f.write(pattern(77, 2 * MiB))
        os.fsync(f.fileno())
    assert m.stop() == 0
    assert "no errors" in run([*vhd_command(), "check", image])


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
    image, model = _image(tmp_path / "images", kind)
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
    # Everything stays dirty in memory until the fsync, whose flush meets the crash point.
    fd = os.open(crashing.raw(image.stem + ".raw"), os.O_WRONLY)
    _write(fd, [*PHASE2, PHASE2_UNALIGNED], 20, model)
    with pytest.raises(OSError, match=r"Software caused connection abort|not connected"):
        os.fsync(fd)
    with pytest.raises(OSError, match=r"Software caused connection abort|not connected"):
        os.close(fd)
    assert crashing.wait_exited() == -signal.SIGKILL
    crashing.cleanup()
    _verify_after_crash(image, tmp_path, durable, model, mount)
    _usable_again(image, mount)


WORKLOAD = r"""
import os, sys, random
raw, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
slots = list(range(int(sys.argv[4])))
rng.shuffle(slots)
fd = os.open(raw, os.O_RDWR)
log = open(journal, "a")
for n, slot in enumerate(slots):
    length = rng.choice([512, 4096, 65536, 200000])
    offset = slot * 262144 + rng.randrange(0, 262144 - length, 512)
    data = rng.randbytes(length)
    try:
        os.pwrite(fd, data, offset)
        if n % 3 == 0:
            os.fsync(fd)
            log.write(f"{offset} {length} {seed} {n}\n")
            log.flush()
            os.fsync(log.fileno())
    except OSError:
        break
"""


def _replay(seed: int, count: int) -> dict[int, tuple[int, bytes]]:
    """What the workload wrote, by write number (it draws everything from one seeded RNG)."""
    rng = random.Random(seed)
    slots = list(range(count))
    rng.shuffle(slots)
    writes = {}
    for n, slot in enumerate(slots):
        length = rng.choice([512, 4096, 65536, 200000])
        offset = slot * 262144 + rng.randrange(0, 262144 - length, 512)
        writes[n] = (offset, rng.randbytes(length))
    return writes


@pytest.mark.parametrize("seed", range(4))
def test_random_kill_under_load(seed: int, tmp_path: Path, mount: Callable[..., Mount]) -> None:
    kind = ["dynamic", "differencing"][seed % 2]
    image, model = _image(tmp_path / "images", kind)
    slots = SIZE // 262144
    m = mount([image], foreground=True, options=["writeback=1", "dirty_limit=1M"])
    journal = tmp_path / "journal"
    journal.touch()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKLOAD,
            m.raw(image.stem + ".raw"),
            str(journal),
            str(seed),
            str(slots),
        ],
    )
    time.sleep(random.Random(seed).uniform(0.3, 1.5))
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_exited() == -signal.SIGKILL
    worker.wait(timeout=60)
    m.cleanup()
    writes = _replay(seed, slots)
    acked = max(
        (int(line.split()[3]) for line in journal.read_text().split("\n") if line), default=-1
    )
    assert acked >= 0, "the load had no fsync acknowledged before the kill"
    durable = bytearray(model)
    maybe = bytearray(model)
    for n, (offset, data) in writes.items():
        if n <= acked:
            durable[offset : offset + len(data)] = data
        maybe[offset : offset + len(data)] = data
    # Writes after the last acknowledged fsync may or may not have reached the image.
    for n, (offset, data) in writes.items():
        if n <= acked:
            maybe[offset : offset + len(data)] = data
    _verify_after_crash_random(image, durable, maybe, writes, acked, mount)
    _usable_again(image, mount)


def _verify_after_crash_random(
    image: Path,
    durable: bytearray,
    maybe: bytearray,
    writes: dict[int, tuple[int, bytes]],
    acked: int,
    mount: Callable[..., Mount],
) -> None:
    ours = _checked_contents(image, mount)
    for n, (offset, data) in writes.items():
        if n <= acked:
            assert ours[offset : offset + len(data)] == data, f"fsynced write {n} lost"
    for sector in range(0, SIZE, 512):
        assert ours[sector : sector + 512] in (
            durable[sector : sector + 512],
            maybe[sector : sector + 512],
        ), f"sector {sector} holds neither its old nor its new contents"
