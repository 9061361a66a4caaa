"""Images made and filled by qemu-img/qemu-io read in vhdfs exactly as `qemu-img convert -O raw`
reads them; images made by `vhd create` are accepted by qemu-img with the same size."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain, run
from tests.support.mounting import Mount, vhd_command

pytestmark = pytest.mark.fuse

# (subformat, size argument, extra -o options, qemu-io writes as (pattern, offset, length))
QEMU_IMAGES = {
    "dynamic-chs-rounded": ("dynamic", "7M", "", [(0x11, 0, 300_000), (0x22, 4_194_817, 3000)]),
    "dynamic-odd-offsets": (
        "dynamic",
        "33M",
        "",
        [(0xA5, 1_048_571, 10), (0x5A, 2_097_151, 2), (0x77, 33 * 1024 * 1024 - 700, 700)],
    ),
    "dynamic-force-size": ("dynamic", "10485761", "force_size=on", [(0x33, 5_000_000, 70_000)]),
    "fixed": ("fixed", "5M", "", [(0x44, 511, 513), (0x55, 3_000_000, 100)]),
    "fixed-force-size": ("fixed", "1050112", "force_size=on", [(0x66, 1_048_000, 2000)]),
}


@pytest.mark.parametrize("name", QEMU_IMAGES)
def test_qemu_images_read_like_qemu_convert(
    name: str, tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    subformat, size, extra, writes = QEMU_IMAGES[name]
    image = tmp_path / "disk.vhd"
    options = ",".join(filter(None, [f"subformat={subformat}", extra]))
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", options, image, size])
    for value, offset, length in writes:
        run(["qemu-io", "-f", "vpc", "-c", f"write -P {value:#x} {offset} {length}", image])
    expected_file = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, expected_file])
    m = mount([image])
    ours = Path(m.raw("disk.raw"))
    assert ours.stat().st_size == expected_file.stat().st_size
    assert ours.read_bytes() == expected_file.read_bytes()
    assert m.stop() == 0


def test_qemu_convert_of_random_data(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    source = tmp_path / "source.raw"
    data = bytearray(os.urandom(9 * 1024 * 1024 + 3 * 512))
    data[2 << 20 : 4 << 20] = bytes(2 << 20)  # an all-zero block qemu-img leaves unallocated
    source.write_bytes(data)
    image = tmp_path / "disk.vhd"
    run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", source, image])
    expected_file = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, expected_file])
    m = mount([image])
    ours = Path(m.raw("disk.raw")).read_bytes()
    assert ours == expected_file.read_bytes()
    assert ours[: len(data)] == data
    assert m.stop() == 0


@pytest.mark.parametrize(
    ("args", "size"),
    [
        (["-t", "fixed"], "10M"),
        (["-t", "dynamic"], "64M"),  # 64 MiB is not CHS-exact: maximum geometry
        (["-b", "512K"], "7346176"),  # CHS-exact: real geometry
        (["-b", "4K"], "3M"),
    ],
)
def test_vhd_create_images_in_qemu(tmp_path: Path, args: list[str], size: str) -> None:
    image = tmp_path / "new.vhd"
    run([*vhd_command(), "create", *args, image, size])
    info = run(["qemu-img", "info", "-f", "vpc", "--output=json", image])
    expected = {"10M": 10 << 20, "64M": 64 << 20, "7346176": 7346176, "3M": 3 << 20}[size]
    assert f'"virtual-size": {expected},' in info
    # qemu-img reads the whole (empty) disk back as zeros.
    raw = tmp_path / "new.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, raw])
    assert raw.stat().st_size == expected
    assert raw.read_bytes() == bytes(expected)


def test_vhd_create_filled_reads_same_in_qemu(tmp_path: Path) -> None:
    built = build_chain(
        tmp_path,
        6 << 20,
        [Layer(block_size=512 << 10, writes=[(1, 7), (2048, 4096), (12000, 288)])],
    )
    expected_file = tmp_path / "qemu.raw"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", built.leaf, expected_file])
    assert expected_file.read_bytes() == bytes(built.expected)
