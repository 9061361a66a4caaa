"""``vhd compare``: any mix of VHD chains and raw files, checked against ``qemu-img compare``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain
from tests.support.mounting import vhd_command

MiB = 1 << 20
SIZE = 8 * MiB


def _vhd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhd_command(), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _qemu_compare(a: Path, a_format: str, b: Path, b_format: str, *, strict: bool = False) -> int:
    # -U: no locks needed. -s (strict) also compares allocation, which vhd compare does not:
    # only for sizes, which it must match as vhd compare does.
    argv = ["qemu-img", "compare", "-U", *(["-s"] if strict else []), "-f", a_format]
    argv += ["-F", b_format, a, b]
    return subprocess.run(argv, capture_output=True, timeout=120).returncode


def _chain_and_raw(tmp_path: Path, depth: int = 1) -> tuple[Path, Path, bytearray]:
    """A chain of ``depth`` images and a raw file of its disk. QEMU reads no differencing
    VHD (its vpc driver has no backing files): compared with it at depth 1 only."""
    layers = [Layer(writes=[(0, 64), (5000, 300)]), Layer(writes=[(10, 8), (9000, 17)])]
    built = build_chain(tmp_path / "chain", SIZE, layers[:depth])
    raw = tmp_path / "flat.img"
    raw.write_bytes(bytes(built.expected))
    return built.leaf, raw, built.expected


def test_an_image_and_its_raw_file_are_identical(tmp_path: Path) -> None:
    image, raw, _ = _chain_and_raw(tmp_path)
    result = _vhd("compare", image, raw)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"{image} and {raw} are identical ({SIZE} bytes)\n",
        "",
    )
    assert _qemu_compare(image, "vpc", raw, "raw") == 0


def test_a_chain_its_flattened_raw_file_and_its_conversion_are_identical(tmp_path: Path) -> None:
    leaf, raw, expected = _chain_and_raw(tmp_path, depth=2)
    assert _vhd("compare", leaf, raw).returncode == 0
    converted = tmp_path / "converted.vhd"
    assert _vhd("convert", leaf, converted).returncode == 0
    assert _vhd("compare", converted, leaf).returncode == 0
    assert _qemu_compare(converted, "vpc", raw, "raw") == 0
    changed = bytearray(expected)
    changed[9000 * 512] ^= 1  # a sector only the child holds
    raw.write_bytes(bytes(changed))
    result = _vhd("compare", leaf, raw)
    assert (result.returncode, result.stdout) == (
        1,
        f"{leaf} and {raw} differ at offset {9000 * 512}\n",
    )


def test_the_first_differing_byte_is_named(tmp_path: Path) -> None:
    leaf, raw, expected = _chain_and_raw(tmp_path)
    offset = 5000 * 512 + 1234
    changed = bytearray(expected)
    changed[offset] ^= 0xFF
    changed[offset + 3 * MiB] ^= 0xFF  # a later difference is not the one reported
    raw.write_bytes(bytes(changed))
    result = _vhd("compare", raw, leaf)
    assert (result.returncode, result.stdout) == (
        1,
        f"{raw} and {leaf} differ at offset {offset}\n",
    )
    assert _qemu_compare(raw, "raw", leaf, "vpc") == 1
    report = json.loads(_vhd("compare", "--json", raw, leaf).stdout)
    assert (report["identical"], report["first_difference"], report["exit_code"]) == (
        False,
        offset,
        1,
    )


def test_disks_of_different_sizes_differ(tmp_path: Path) -> None:
    leaf, raw, expected = _chain_and_raw(tmp_path)
    raw.write_bytes(bytes(expected) + bytes(512))
    result = _vhd("compare", leaf, raw)
    assert (result.returncode, result.stdout) == (
        1,
        f"{leaf} and {raw} differ in size: {SIZE} and {SIZE + 512} bytes\n",
    )
    assert _qemu_compare(leaf, "vpc", raw, "raw", strict=True) == 1


def test_a_file_of_another_format_is_refused_in_one_line(tmp_path: Path) -> None:
    leaf, _, _ = _chain_and_raw(tmp_path)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "8M"], check=True)
    result = _vhd("compare", leaf, qcow2)
    assert result.returncode not in (0, 1)
    assert len(result.stderr.splitlines()) == 1
    assert str(qcow2) in result.stderr


@pytest.mark.parametrize("block_size", [512, 256 * MiB])
def test_the_smallest_and_largest_blocks(block_size: int, tmp_path: Path) -> None:
    layers = [Layer(block_size=block_size, writes=[(0, 64), (5000, 300)])]
    layers.append(Layer(block_size=block_size, writes=[(10, 8), (9000, 17)]))
    built = build_chain(tmp_path / "chain", SIZE, layers)
    raw = tmp_path / "flat.img"
    raw.write_bytes(bytes(built.expected))
    assert _vhd("compare", built.leaf, raw).returncode == 0
    changed = bytearray(built.expected)
    changed[SIZE - 1] ^= 1  # the very last byte
    raw.write_bytes(bytes(changed))
    result = _vhd("compare", raw, built.leaf)
    assert (result.returncode, result.stdout) == (
        1,
        f"{raw} and {built.leaf} differ at offset {SIZE - 1}\n",
    )
