"""Several writers at once: fio with verification on disjoint ranges, and processes racing on
the same blocks. Nothing may be lost or torn, before or after a remount."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import run
from tests.support.mounting import Mount
from vhdfs.image.create import create_differencing, create_dynamic

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def _fio(raw: str, folder: Path, *extra: str) -> None:
    # fio leaves its verify state files in the working directory: keep them in the test's.
    run(
        [
            "fio",
            "--name=writers",
            f"--filename={raw}",
            "--rw=randwrite",
            "--bs=4k",
            "--size=4M",
            "--numjobs=4",
            "--offset_increment=4M",
            "--ioengine=psync",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--fsync=16",
            "--group_reporting",
            *extra,
        ],
        cwd=folder,
    )


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_fio_writers_verify_before_and_after_remount(
    kind: str, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), 32 * MiB, 512 << 10)
    image = base
    if kind == "differencing":
        image = tmp_path / "child.vhd"
        create_differencing(str(image), str(base), 64 << 10)
    m = mount([image], options=["dirty_limit=2M"])
    raw = m.raw(image.stem + ".raw")
    _fio(raw, tmp_path)  # writes, then reads everything back and checks it
    assert m.stop() == 0
    # verify_only replays the write job without writing (it opens the file for writing).
    again = mount([image])
    _fio(again.raw(image.stem + ".raw"), tmp_path, "--verify_only")
    assert again.stop() == 0


WRITER = r"""
import hashlib, os, random, sys
path, writer, blocks, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_WRONLY)
rng = random.Random(writer)
order = list(range(blocks)) * rounds
rng.shuffle(order)
for seq, block in enumerate(order):
    head = f"w{writer} b{block} s{seq} ".encode().ljust(64, b".")
    body = hashlib.sha256(head).digest() * ((4096 - 64) // 32)
    os.pwrite(fd, head + body, block * 4096)
os.fsync(fd)
os.close(fd)
"""


def test_racing_writers_never_tear_a_block(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = tmp_path / "race.vhd"
    create_dynamic(str(image), 8 * MiB, 64 << 10)
    m = mount([image])
    raw = m.raw("race.raw")
    blocks = 256
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, raw, str(n), str(blocks), "3"])
        for n in range(4)
    ]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0, 0]
    assert m.stop() == 0
    again = mount([image], options=["ro"])
    data = Path(again.raw("race.raw")).read_bytes()
    assert again.stop() == 0
    seen = set()
    for block in range(blocks):
        chunk = data[block * 4096 : (block + 1) * 4096]
        head, body = chunk[:64], chunk[64:]
        assert head.startswith(b"w"), f"block {block} was lost: {head[:16]!r}"
        assert body == hashlib.sha256(head).digest() * ((4096 - 64) // 32), f"block {block} torn"
        assert f" b{block} ".encode() in head
        seen.add(head.split()[0])
    assert data[blocks * 4096 :] == bytes(len(data) - blocks * 4096)
    assert len(seen) > 1  # the writers really did race
