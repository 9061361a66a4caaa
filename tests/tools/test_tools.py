"""vhd convert, commit, compact and resize through the real command, each result compared
with a model and with independent readers (qemu-img convert for fixed and dynamic images,
vhdimount for every type), and vhd check clean."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CORPUS, unpack_case
from tests.support.craft import Item, craft
from tests.support.files import sha256_file, tree_hashes
from tests.support.images import SECTOR, Layer, build_chain, pattern, run
from tests.support.mounting import read_with_vhdimount, vhd_command
from tests.support.vhdwrite import write_sectors
from vhdfs.image.create import create_dynamic, create_fixed

pytestmark = pytest.mark.fuse  # vhdimount is a FUSE file system

MiB = 1 << 20


def vhd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhd_command(), *map(str, args)], capture_output=True, text=True, timeout=600
    )


def vhd_json(*args: str | Path) -> dict[str, Any]:
    result = vhd(*args, "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    document: dict[str, Any] = json.loads(result.stdout)
    assert document["version"] == 1
    return document


def qemu_view(image: Path, tmp_path: Path) -> bytes:
    """The disk as qemu-img reads the image (fixed and dynamic images only)."""
    target = tmp_path / f"{image.name}.qemu"
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, target])
    data = target.read_bytes()
    target.unlink()
    return data


def vhdimount_view(image: Path, tmp_path: Path) -> bytes:
    mountpoint = tmp_path / "vhdi"
    mountpoint.mkdir(exist_ok=True)
    return read_with_vhdimount(str(image), str(mountpoint))


def assert_clean(image: Path) -> None:
    result = vhd("check", image)
    assert result.returncode == 0, result.stdout
    assert "leak:" not in result.stdout, result.stdout


def _chain(tmp_path: Path) -> tuple[list[Path], bytearray]:
    # Runs aligned to 8 sectors, so vhdimount's bitmap-byte bug does not matter.
    layers = [
        Layer(writes=[(0, 2048), (6000, 800)]),
        Layer(block_size=512 << 10, writes=[(8, 16), (4096, 1024), (9000, 8)]),
        Layer(block_size=64 << 10, writes=[(24, 8), (5000, 2000)]),
    ]
    built = build_chain(tmp_path / "chain", 8 * MiB, layers)
    return built.paths, built.expected


# -- convert ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_convert_flattens_a_chain(kind: str, tmp_path: Path) -> None:
    paths, expected = _chain(tmp_path)
    before = tree_hashes(tmp_path / "chain")
    out = tmp_path / "flat.vhd"
    report = vhd_json("convert", "-t", kind, paths[0], out)
    assert (report["kind"], report["virtual_size"], report["source_format"]) == (
        kind,
        8 * MiB,
        "vhd",
    )
    assert tree_hashes(tmp_path / "chain") == before
    assert qemu_view(out, tmp_path) == expected
    assert vhdimount_view(out, tmp_path) == expected
    assert_clean(out)
    info = vhd_json("info", out)
    if kind == "dynamic":  # only blocks that hold data were allocated
        assert info["layers"][0]["allocated_blocks"] == 3


def test_convert_raw_both_ways_sparse(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    data = bytearray(6 * MiB + 3 * SECTOR)  # not a whole number of MiB
    data[MiB : 2 * MiB] = pattern(1, MiB)
    data[-SECTOR:] = pattern(2, SECTOR)
    raw.write_bytes(data)
    vhd_file = tmp_path / "disk.vhd"
    assert vhd_json("convert", raw, vhd_file)["source_format"] == "raw"
    assert qemu_view(vhd_file, tmp_path) == data
    back = tmp_path / "back.img"
    assert vhd_json("convert", "-O", "raw", vhd_file, back)["data_bytes"] == MiB + 3 * SECTOR
    assert back.read_bytes() == data
    assert os.stat(back).st_blocks * 512 <= 4 * MiB  # written sparse
    azure = tmp_path / "azure.vhd"
    report = vhd_json("convert", "--azure", raw, azure)
    assert (report["kind"], report["virtual_size"]) == ("fixed", 7 * MiB)
    assert vhd("check", "--azure", azure).returncode == 0
    assert qemu_view(azure, tmp_path) == data + bytes(7 * MiB - len(data))
    unfit = vhd("check", "--azure", vhd_file)
    assert unfit.returncode == 1
    assert "Azure takes fixed images only" in unfit.stdout
    assert "is not a whole number of MiB" in unfit.stdout


def test_convert_never_overwrites_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    paths, _ = _chain(tmp_path)
    taken = tmp_path / "taken.vhd"
    taken.write_bytes(b"precious")
    result = vhd("convert", paths[0], taken)
    assert (result.returncode, result.stderr) == (
        2,
        f"vhd: {taken}: already exists; refusing to overwrite it\n",
    )
    assert taken.read_bytes() == b"precious"
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small])
    try:
        full = vhd("convert", "-O", "raw", paths[0], small / "out.img")
        assert full.returncode == 7
        assert os.listdir(small) == []
    finally:
        run(["umount", small])


def _content_cases() -> list[Any]:
    import json as _json

    cases = _json.loads((CORPUS / "manifest.json").read_text())["cases"]
    return [pytest.param(c, id=c["name"]) for c in cases if c["expect"] == "content"]


@pytest.mark.parametrize("case", _content_cases())
def test_third_party_images_convert(case: dict[str, Any], tmp_path: Path) -> None:
    folder = unpack_case(case, tmp_path / "corpus")
    out = tmp_path / "converted.vhd"
    vhd_json("convert", folder / case["mount"], out)
    assert_clean(out)
    flat = tmp_path / "flat.img"
    vhd_json("convert", "-O", "raw", out, flat)
    assert sha256_file(flat) == case["sha256"]


# -- commit ----------------------------------------------------------------------------------


def test_commit_one_level_then_all(tmp_path: Path) -> None:
    paths, expected = _chain(tmp_path)
    top, mid, base = paths
    report = vhd_json("commit", top)
    assert report["levels"] == [{"child": str(top), "parent": str(mid)}]
    # mid now reads as top did; top is empty and reads the same through mid.
    assert vhdimount_view(mid, tmp_path) == expected
    assert vhdimount_view(top, tmp_path) == expected
    assert vhd_json("info", top)["layers"][0]["allocated_blocks"] == 0
    for image in (top, mid, base):
        assert_clean(image)
    report = vhd_json("commit", "--all", top)
    assert [level["parent"] for level in report["levels"]] == [str(mid), str(base)]
    assert qemu_view(base, tmp_path) == expected
    assert vhdimount_view(top, tmp_path) == expected
    assert os.path.getsize(mid) < 64 << 10
    for image in (top, mid, base):
        assert_clean(image)


def test_commit_remove_and_refusals(tmp_path: Path, mount: Any) -> None:
    paths, expected = _chain(tmp_path)
    top, mid, base = paths
    m = mount([top], options=["ro"])
    busy = vhd("commit", top)
    assert busy.returncode == 6
    # The refusal names the mount that holds the image, and how to let go of it.
    held = f"in use by the vhdfs mount at {m.mountpoint}"
    hint = f"(unmount it first: vhdfs -u {shlex.quote(m.mountpoint)})"
    assert busy.stderr == f"vhd: {top}: {held} {hint}\n"
    assert m.stop() == 0
    assert vhd("commit", base).returncode == 2
    report = vhd_json("commit", "--all", "--remove", top)
    assert report["removed"] == [str(top), str(mid)]
    assert not top.exists()
    assert not mid.exists()
    assert qemu_view(base, tmp_path) == expected


def test_tools_name_the_mount_writing_an_image(tmp_path: Path, mount: Any) -> None:
    paths, _ = _chain(tmp_path)
    top = paths[0]
    m = mount([top])  # read-write: a writer, nobody else may even read
    held = f"in use by the vhdfs mount at {m.mountpoint}"
    hint = f"(unmount it first: vhdfs -u {shlex.quote(m.mountpoint)})"
    for args in (["commit", top], ["compact", top], ["convert", top, tmp_path / "out.vhd"]):
        result = vhd(*args)
        assert (result.returncode, result.stderr) == (6, f"vhd: {top}: {held} {hint}\n"), args
    check = vhd("check", top)
    assert check.returncode == 2
    assert f"error: {top}: {held} {hint}" in check.stdout
    assert m.stop() == 0
    assert not (tmp_path / "out.vhd").exists()


@pytest.mark.parametrize(
    "name", ["vhdutil_chain2_samedir", "vhdutil_chain3_updir", "minivhd_chain3_subdir"]
)
def test_third_party_chains_commit(name: str, tmp_path: Path) -> None:
    case = next(
        c for c in json.loads((CORPUS / "manifest.json").read_text())["cases"] if c["name"] == name
    )
    folder = unpack_case(case, tmp_path / "corpus")
    leaf = folder / case["mount"]
    vhd_json("commit", "--all", leaf)
    flat = tmp_path / "flat.img"
    vhd_json("convert", "-O", "raw", leaf, flat)
    assert sha256_file(flat) == case["sha256"]
    assert vhd("check", leaf).returncode == 0


# -- compact ---------------------------------------------------------------------------------


def test_compact_drops_zero_blocks_fills_holes_and_shrinks(tmp_path: Path) -> None:
    block = 64 << 10
    image = tmp_path / "d.vhd"
    # Blocks in reverse order with gaps between them (leaked space), two of them all zeros.
    layout: list[Item] = [
        "header", "bat", ("gap", 3 * block), ("block", 7), ("gap", block), ("block", 5),
        ("block", 3), ("gap", 2 * block), ("block", 1), ("block", 0),
    ]  # fmt: skip
    data = {b: pattern(b, block) for b in (7, 3, 0)} | {5: bytes(block), 1: bytes(block)}
    craft(image, size=8 * block, block_size=block, layout=layout, data=data, align_data=True)
    expected = qemu_view(image, tmp_path)
    size = image.stat().st_size
    report = vhd_json("compact", image)
    assert (report["blocks_dropped"], report["old_size"]) == (2, size)
    assert report["new_size"] == image.stat().st_size < size - 6 * block
    assert report["bytes_reclaimed"] == size - report["new_size"]
    assert qemu_view(image, tmp_path) == expected
    assert vhdimount_view(image, tmp_path) == expected
    assert_clean(image)
    again = vhd_json("compact", image)
    assert (again["bytes_reclaimed"], again["blocks_moved"]) == (0, 0)


def test_compact_differencing_keeps_zeros_that_hide_the_parent(tmp_path: Path) -> None:
    paths, expected = _chain(tmp_path)
    top = paths[0]
    write_sectors(str(top), 4096 * SECTOR, bytes(64 << 10))  # zeros over the parent's data
    expected[4096 * SECTOR : 4096 * SECTOR + (64 << 10)] = bytes(64 << 10)
    vhd_json("compact", top)
    assert vhdimount_view(top, tmp_path) == expected
    assert_clean(top)


@pytest.mark.parametrize("name", ["vhdutil_dyn", "minivhd_dyn_512k", "qemu_convert_dyn"])
def test_third_party_images_compact(name: str, tmp_path: Path) -> None:
    case = next(
        c for c in json.loads((CORPUS / "manifest.json").read_text())["cases"] if c["name"] == name
    )
    folder = unpack_case(case, tmp_path / "corpus")
    image = folder / case["mount"]
    report = vhd_json("compact", image)
    assert report["kept_zero_blocks"] == (name == "vhdutil_dyn")
    flat = tmp_path / "flat.img"
    vhd_json("convert", "-O", "raw", image, flat)
    assert sha256_file(flat) == case["sha256"]
    assert vhd("check", image).returncode == 0


# -- resize ----------------------------------------------------------------------------------


def test_resize_fixed(tmp_path: Path) -> None:
    image = tmp_path / "f.vhd"
    create_fixed(str(image), 4 * MiB)
    write_sectors(str(image), 4 * MiB - SECTOR, pattern(3, SECTOR))
    report = vhd_json("resize", image, "6M")
    assert (report["old_size"], report["new_size"]) == (4 * MiB, 6 * MiB)
    view = qemu_view(image, tmp_path)
    assert view[4 * MiB - SECTOR : 4 * MiB] == pattern(3, SECTOR)
    assert view[4 * MiB :] == bytes(2 * MiB)  # the old footer's place reads as zeros
    assert vhdimount_view(image, tmp_path) == view
    refused = vhd("resize", image, "3M")
    assert refused.returncode == 2
    assert "--shrink" in refused.stderr
    over_data = vhd("resize", "--shrink", image, "3M")
    assert over_data.returncode == 2
    assert "data lies past the new end" in over_data.stderr
    vhd_json("resize", "--shrink", image, "5M")
    assert qemu_view(image, tmp_path) == view[: 5 * MiB]
    assert_clean(image)


def test_resize_dynamic_moves_a_full_bat(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 4 * MiB)
    write_sectors(str(image), 3 * MiB, pattern(4, MiB))
    report = vhd_json("resize", image, "64M")
    assert report["relocated_table"] is True
    view = qemu_view(image, tmp_path)
    assert len(view) == 64 * MiB
    assert view[3 * MiB : 4 * MiB] == pattern(4, MiB)
    assert view[4 * MiB :] == bytes(60 * MiB)
    assert vhdimount_view(image, tmp_path) == view
    assert vhd("check", image).returncode == 0
    # The grown image takes writes anywhere, the new space included.
    write_sectors(str(image), 60 * MiB, pattern(5, MiB))
    assert qemu_view(image, tmp_path)[60 * MiB : 61 * MiB] == pattern(5, MiB)
    assert vhd_json("resize", "--shrink", image, "62M")["new_size"] == 62 * MiB
    refused = vhd("resize", "--shrink", image, "32M")
    assert "holds data past the new end" in refused.stderr


def test_resize_refuses_a_differencing_image(tmp_path: Path) -> None:
    paths, _ = _chain(tmp_path)
    result = vhd("resize", paths[0], "16M")
    assert result.returncode == 2
    assert "a differencing image has its parent's size" in result.stderr
