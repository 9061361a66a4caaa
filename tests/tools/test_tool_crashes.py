"""kill -9 of vhd commit, compact and resize at every crash point of their plans, and at
random moments: afterwards every image opens in vhdfs, qemu-img and vhdimount, reads as it
did before (or, for resize, keeps its data), and a rerun finishes the job.

The crash points are those of vhdfs.image.commit and vhdfs.image.reshape (VHDFS_CRASH_AT).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.craft import Item, craft
from tests.support.images import SECTOR, Layer, build_chain, pattern
from tests.support.mounting import vhd_command
from tests.support.vhdwrite import write_sectors
from tests.tools.test_tools import qemu_view, vhd, vhdimount_view

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BLOCK = 64 << 10


def _killed_at(point: str, *args: str | Path) -> None:
    """Run ``vhd ARGS`` so that it kills itself at ``point``; it must get there."""
    result = subprocess.run(
        [*vhd_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VHDFS_CRASH_AT": point},
    )
    assert result.returncode == -signal.SIGKILL, f"{point} not reached: {result.stderr}"


def _flat(image: Path, tmp_path: Path) -> bytes:
    """The disk of ``image`` (its chain flattened) as vhdfs reads it."""
    target = tmp_path / "flat.img"
    if target.exists():
        target.unlink()
    result = vhd("convert", "-O", "raw", image, target)
    assert result.returncode == 0, result.stderr
    return target.read_bytes()


def _no_errors(*images: Path) -> None:
    for image in images:
        result = vhd("check", image)
        assert result.returncode == 0, result.stdout


COMMIT_POINTS = [
    "alloc-footer-written",
    "alloc-block-written",
    "flush-data-written",
    "flush-data-synced",
    "flush-bitmaps-written",
    "flush-bat-written",
    "commit-parent-synced",
    "empty-bat-cleared",
    "empty-footer-written",
]


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_commit_survives_a_kill(point: str, tmp_path: Path) -> None:
    layers = [
        Layer(writes=[(0, 4096), (20000, 64)]),  # the parent has some blocks, not all
        Layer(block_size=BLOCK, writes=[(8, 256), (6000, 512), (16384, 1024), (20008, 8)]),
    ]
    built = build_chain(tmp_path / "chain", 16 * MiB, layers)
    child, parent = built.paths
    _killed_at(point, "commit", child)
    # The chain through the child reads the same, in vhdfs and vhdimount; both images check.
    assert _flat(child, tmp_path) == built.expected
    assert vhdimount_view(child, tmp_path) == built.expected
    qemu_view(parent, tmp_path)  # qemu-img still opens the parent
    _no_errors(child, parent)
    assert vhd("commit", child).returncode == 0
    assert qemu_view(parent, tmp_path) == built.expected
    assert _flat(child, tmp_path) == built.expected
    _no_errors(child, parent)


def _compactable(tmp_path: Path) -> tuple[Path, bytes]:
    image = tmp_path / "d.vhd"
    # Reversed blocks, holes of odd sizes (some moves bounce), two all-zero blocks.
    layout: list[Item] = [
        "header", "bat", ("gap", BLOCK // 2), ("block", 9), ("gap", 3 * BLOCK), ("block", 7),
        ("block", 5), ("gap", BLOCK + 4096), ("block", 3), ("block", 2), ("gap", 5000),
        ("block", 0),
    ]  # fmt: skip
    data = {b: pattern(b + 1, BLOCK) for b in (9, 5, 3, 0)} | {7: bytes(BLOCK), 2: bytes(BLOCK)}
    craft(image, size=12 * BLOCK, block_size=BLOCK, layout=layout, data=data, align_data=True)
    return image, qemu_view(image, tmp_path)


@pytest.mark.parametrize(
    "point",
    ["compact-dropped", "compact-moved", "compact-moved:2", "compact-moved:3",
     "compact-footer-written"],
)  # fmt: skip
def test_compact_survives_a_kill(point: str, tmp_path: Path) -> None:
    image, expected = _compactable(tmp_path)
    _killed_at(point, "compact", image)
    assert qemu_view(image, tmp_path) == expected
    assert vhdimount_view(image, tmp_path) == expected
    assert _flat(image, tmp_path) == expected
    _no_errors(image)
    assert vhd("compact", image).returncode == 0
    assert qemu_view(image, tmp_path) == expected
    result = vhd("check", image)
    assert (result.returncode, "leak:" in result.stdout) == (0, False), result.stdout


@pytest.mark.parametrize(
    ("kind", "point"),
    [
        ("dynamic", "resize-footer-moved"),
        ("dynamic", "resize-bat-copied"),
        ("dynamic", "resize-header-written"),
        ("dynamic", "resize-trailing-written"),
        ("fixed", "resize-footer-moved"),
        ("fixed", "resize-trailing-written"),
    ],
)
def test_resize_survives_a_kill(kind: str, point: str, tmp_path: Path) -> None:
    image = tmp_path / "r.vhd"
    assert vhd("create", "-t", kind, image, "4M").returncode == 0
    data = pattern(9, MiB)
    write_sectors(str(image), 3 * MiB, data)
    _killed_at(point, "resize", image, "64M")
    # Valid, with its data, at the old size or the new one.
    view = _flat(image, tmp_path)
    assert len(view) in (4 * MiB, 64 * MiB)
    assert view[3 * MiB : 4 * MiB] == data
    assert view[4 * MiB :] == bytes(len(view) - 4 * MiB)
    if kind == "dynamic":
        assert qemu_view(image, tmp_path)[3 * MiB : 4 * MiB] == data
    checked = vhd("check", image)
    if (kind, point) == ("dynamic", "resize-trailing-written"):
        # Between the two footers: named as the interrupted resize it is, not as damage.
        size = 64 * MiB
        assert (checked.returncode, checked.stdout) == (
            3,
            f"interrupted: {image}: a resize to {size} bytes was interrupted between its two "
            f"footer writes (the copy at offset 0 still has the old size); finish it: vhd "
            f"resize {image} {size}\n",
        )
    else:
        assert (checked.returncode, checked.stdout) == (0, f"{image}: no errors in 1 image(s)\n")
    assert vhd("resize", image, "64M").returncode == 0
    view = qemu_view(image, tmp_path)
    assert len(view) == 64 * MiB
    assert view[3 * MiB : 4 * MiB] == data
    _no_errors(image)


@pytest.mark.parametrize("seed", range(4))
def test_compact_killed_at_random(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    image = tmp_path / "big.vhd"
    assert vhd("create", "-b", "512K", image, "96M").returncode == 0
    for block in rng.sample(range(192), 80):
        data = bytes(512 << 10) if rng.random() < 0.3 else pattern(block, 512 << 10)
        write_sectors(str(image), block * (512 << 10), data)
    for block in rng.sample(range(192), 20):  # leave holes: clear entries of written blocks
        _clear_entry(image, block)
    expected = qemu_view(image, tmp_path)
    process = subprocess.Popen(
        [*vhd_command(), "compact", str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(rng.uniform(0.05, 0.6))
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert qemu_view(image, tmp_path) == expected
    assert _flat(image, tmp_path) == expected
    _no_errors(image)
    assert vhd("compact", image).returncode == 0
    assert qemu_view(image, tmp_path) == expected
    assert "leak:" not in vhd("check", image).stdout


def _clear_entry(image: Path, block: int) -> None:
    with open(image, "r+b") as f:
        f.seek(1536 + 4 * block)
        f.write(b"\xff\xff\xff\xff")


def test_a_sector_run_that_ends_a_block_commits_exactly(tmp_path: Path) -> None:
    # The last sector of a child block and the first of the next, each alone.
    layers = [Layer(writes=[(0, 256)]), Layer(block_size=BLOCK, writes=[(127, 1), (128, 1)])]
    built = build_chain(tmp_path / "chain", MiB, layers)
    assert vhd("commit", built.paths[0]).returncode == 0
    assert qemu_view(built.paths[1], tmp_path) == built.expected
    assert built.expected[127 * SECTOR] != 0
