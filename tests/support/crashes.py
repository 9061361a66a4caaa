"""Kill -9 under load: the scenario the crash tests and the crash campaign share.

A writer process makes random, overlapping writes (512 B to 200 KB, new blocks, existing
blocks, partial sectors) into the first half of the disk until the daemon dies, fsyncing after
every third one and recording each fsync it got back in a journal; optionally fio runs a mixed
read/write/fsync load over the second half at the same time. The daemon is killed with SIGKILL
at a random instant while both are running. Afterwards the image must pass ``vhd check`` (leaks
allowed) and read the same in vhdfs and QEMU (dynamic images); every sector must hold what the
fsync-acknowledged writes left there, or, where a write after the last acknowledged fsync
touched it, that write's data; and libvhdi must agree wherever it can (see below).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import Layer, build_chain, pattern, run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command
from vhdfs.image.create import create_differencing

MiB = 1 << 20
SIZE = 16 * MiB
#: The writer's region: the first half of the disk.
REGION = SIZE // 2
#: The writer fsyncs after every FSYNC_EVERY-th write, so at most that many follow the last
#: acknowledged fsync when the daemon dies.
FSYNC_EVERY = 3

MountFactory = Callable[..., Mount]


def make_image(folder: Path, kind: str) -> tuple[Path, bytearray]:
    if kind == "differencing":
        built = build_chain(folder, SIZE, [Layer(writes=[(0, 4096), (20000, 500)])])
        child = folder / "child.vhd"
        create_differencing(str(child), str(built.leaf), 512 << 10)
        return child, built.expected
    built = build_chain(folder, SIZE, [Layer(block_size=1 << 20)])
    return built.leaf, built.expected


def checked_contents(image: Path, mount: Callable[..., Mount]) -> bytes:
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


def usable_again(image: Path, mount: Callable[..., Mount]) -> None:
    """After a crash the image takes new writes and stays clean."""
    m = mount([image])
    with open(m.raw(image.stem + ".raw"), "r+b") as f:
        f.seek(SIZE - 3 * MiB)
        f.write(pattern(77, 2 * MiB))
        os.fsync(f.fileno())
    assert m.stop() == 0
    assert "no errors" in run([*vhd_command(), "check", image])


WORKLOAD = r"""
import os, sys, random
raw, journal, seed, region, every = sys.argv[1:3] + [int(a) for a in sys.argv[3:6]]
rng = random.Random(seed)
fd = os.open(raw, os.O_RDWR)
log = open(journal, "a")
for n in range(1_000_000):  # ends when the daemon dies; the bound only guards a broken test
    length = rng.choice([512, 4096, 65536, 200000])
    offset = rng.randrange(0, region - length, 512)
    data = rng.randbytes(length)
    try:
        assert os.pwrite(fd, data, offset) == length  # the model holds whole writes
        if n % every == 0:
            os.fsync(fd)
            log.write(f"{n}\n")
            log.flush()
            os.fsync(log.fileno())
    except OSError:
        break
"""


def replay(seed: int, count: int) -> list[tuple[int, bytes]]:
    """The first ``count`` writes of the workload (it draws everything from one seeded RNG)."""
    rng = random.Random(seed)
    writes = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 200000])
        offset = rng.randrange(0, REGION - length, 512)
        writes.append((offset, rng.randbytes(length)))
    return writes


@dataclass
class Expected:
    """What the disk may hold after a crash.

    ``durable`` is the disk as the fsync-acknowledged writes left it; ``alternatives`` maps a
    sector to the other contents it may hold: those of the writes after the last acknowledged
    fsync, which may or may not have reached the image, wholly or in part.
    """

    durable: bytearray
    alternatives: dict[int, list[bytes]]
    #: Pages (4 KiB) some write covers only partly, or an unacknowledged write touches.
    uncertain_pages: set[int]


def expected_after(model: bytes, writes: list[tuple[int, bytes]], acked: int) -> Expected:
    """The expectation when writes ``0..acked`` were acknowledged and the rest may be there.

    A sector an unacknowledged write touches may hold the result of any of those writes,
    taken in order, having reached it or not (a write need not end on a sector boundary, so
    a sector may hold one write's head over another's contents).
    """
    durable = bytearray(model)
    uncertain: set[int] = set()
    for n, (offset, data) in enumerate(writes):
        end = offset + len(data)
        for edge in (offset, end):
            if edge % 4096:
                uncertain.add(edge - edge % 4096)
        if n <= acked:
            durable[offset:end] = data
    later = writes[acked + 1 :]
    touched = sorted(
        {
            sector
            for offset, data in later
            for sector in range(offset - offset % 512, offset + len(data), 512)
        }
    )
    alternatives: dict[int, list[bytes]] = {}
    for sector in touched:
        uncertain.add(sector - sector % 4096)
        found = set()
        for chosen in itertools.product((False, True), repeat=len(later)):
            contents = bytearray(durable[sector : sector + 512])
            for applied, (offset, data) in zip(chosen, later, strict=True):
                start, stop = max(sector, offset), min(sector + 512, offset + len(data))
                if applied and start < stop:
                    contents[start - sector : stop - sector] = data[start - offset : stop - offset]
            found.add(bytes(contents))
        alternatives[sector] = sorted(found)
    return Expected(durable, alternatives, uncertain)


def verify_after_random_crash(image: Path, ours: bytes, expected: Expected) -> None:
    """``ours`` (the disk as vhdfs reads it after the crash) is as ``expected``, and so is
    libvhdi's reading wherever it can be trusted."""
    durable = expected.durable
    for sector in range(0, SIZE, 512):
        now = ours[sector : sector + 512]
        if now != durable[sector : sector + 512]:
            assert now in expected.alternatives.get(sector, ()), (
                f"sector {sector} holds neither what the acknowledged writes left there nor "
                "what a later write put there"
            )
    vhdi = image.parent / "vhdi"
    vhdi.mkdir(exist_ok=True)
    theirs = read_with_vhdimount(str(image), str(vhdi))
    # libvhdi misreads bitmap bytes that are partly set (see the interop tests), and one bitmap
    # byte maps one 4 KiB page: compare the pages no write covers partly and no unacknowledged
    # write touches.
    for page in range(0, SIZE, 4096):
        if page not in expected.uncertain_pages:
            assert theirs[page : page + 4096] == ours[page : page + 4096], page


def kill_under_load(
    folder: Path, kind: str, seed: int, mount: MountFactory, *, fio: bool = False
) -> int:
    """Run the scenario once on a fresh ``kind`` image under ``folder``; raise if it fails.

    Returns how many of the writer's writes an fsync had acknowledged when the daemon died.
    """
    rng = random.Random(seed)
    image, model = make_image(folder / "images", kind)
    m = mount([image], foreground=True, options=["writeback=1", "dirty_limit=1M"])
    raw = m.raw(image.stem + ".raw")
    journal = folder / "journal"
    journal.touch()
    argv = [raw, str(journal), str(seed), str(REGION), str(FSYNC_EVERY)]
    writer = subprocess.Popen([sys.executable, "-c", WORKLOAD, *argv])
    load = None
    if fio:
        load = subprocess.Popen(
            [
                "fio",
                "--name=load",
                f"--filename={raw}",
                "--rw=randrw",
                "--bsrange=4k-128k",  # whole pages: libvhdi can compare them too
                "--ioengine=psync",
                "--fsync=8",
                f"--offset={REGION}",
                f"--size={SIZE - REGION}",
                "--time_based",
                "--runtime=30",
                f"--randseed={seed}",
                "--output=/dev/null",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    killed = False
    try:
        # The kill comes at a random instant after the first fsync was acknowledged (Python's
        # start-up under load may take longer than the shortest delay).
        deadline = time.monotonic() + 60
        while not journal.read_text() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.2))
        assert writer.poll() is None, "the writer stopped before the kill"
        assert load is None or load.poll() is None, "fio stopped before the kill"
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)
        assert m.wait_exited() == -signal.SIGKILL
        killed = True
    finally:
        # After the kill both end on their own (their next request fails); on any other way
        # out they are stopped here, by the PIDs started above.
        for process in (writer, load):
            if process is None:
                continue
            if not killed:
                process.kill()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        m.cleanup()
    acked = max((int(line) for line in journal.read_text().split()), default=-1)
    assert acked >= 0, "no fsync was acknowledged before the kill"
    # The writer may have got as far as the write before its next fsync.
    writes = replay(seed, acked + FSYNC_EVERY + 1)
    expected = expected_after(model, writes, acked)
    ours = checked_contents(image, mount)
    if fio:
        # fio's half is not modelled: whatever the image holds there is accepted, but every
        # reader must agree with vhdfs.
        expected.durable[REGION:] = ours[REGION:]
    verify_after_random_crash(image, ours, expected)
    usable_again(image, mount)
    return acked + 1
