"""The vhd tool and the help texts, through the real commands."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.mounting import vhd_command, vhdfs_command
from vhdfs.units import format_size, parse_size

GOLDEN = Path(__file__).parent / "golden"


def _run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60, env=env, **kwargs
    )


def vhd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return _run([*vhd_command(), *args])


@pytest.mark.parametrize(
    ("argv", "golden"),
    [
        (["vhdfs", "--help"], "vhdfs-help.txt"),
        (["vhd", "--help"], "vhd-help.txt"),
        (["vhd", "info", "--help"], "vhd-info-help.txt"),
        (["vhd", "create", "--help"], "vhd-create-help.txt"),
        (["vhd", "check", "--help"], "vhd-check-help.txt"),
        (["vhd", "convert", "--help"], "vhd-convert-help.txt"),
        (["vhd", "commit", "--help"], "vhd-commit-help.txt"),
        (["vhd", "compact", "--help"], "vhd-compact-help.txt"),
        (["vhd", "compare", "--help"], "vhd-compare-help.txt"),
        (["vhd", "resize", "--help"], "vhd-resize-help.txt"),
    ],
)
def test_help_matches_golden_copy(argv: list[str], golden: str) -> None:
    command = vhdfs_command() if argv[0] == "vhdfs" else vhd_command()
    result = _run([*command, *argv[1:]])
    assert result.returncode == 0
    assert result.stdout == (GOLDEN / golden).read_text()


def test_units() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("512K") == 512 << 10
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("2m") == 2 << 20
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12Q")
    assert format_size(1023) == "1023 B"
    assert format_size(64 << 20) == "64 MiB"
    assert format_size(7346176) == "7.01 MiB"


def test_create_and_info_of_a_chain(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "sub" / "top.vhd"
    top.parent.mkdir()
    result = vhd("create", "-b", "512K", base, "100M")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"created {base}: dynamic (512 KiB blocks), 100 MiB (104857600 bytes)\n",
        "",
    )
    assert vhd("create", "--parent", base, mid).returncode == 0
    assert vhd("create", "-p", mid, top).returncode == 0
    report = json.loads(vhd("info", "--json", top).stdout)
    assert (report["depth"], report["complete"], report["virtual_size"]) == (3, True, 100 << 20)
    top_layer, mid_layer, base_layer = report["layers"]
    assert top_layer["parent"]["path"] == str(mid)
    assert top_layer["parent"]["id_matches"] is True
    assert top_layer["parent"]["unique_id"] == mid_layer["unique_id"]
    assert mid_layer["found_by"] == "W2ru locator (slot 0)"
    assert top_layer["parent"]["locators"] == ["W2ru", "W2ku", "MacX"]
    assert base_layer["block_size"] == 512 << 10
    assert base_layer["blocks"] == 200
    assert base_layer["allocated_blocks"] == 0
    assert base_layer["geometry"] == {
        "cylinders": 65535,
        "heads": 16,
        "sectors_per_track": 255,
        "size": 136899993600,
    }
    text = vhd("info", top).stdout
    assert f"image: {top}\n  type          differencing\n" in text
    assert "\n  block size    512 KiB\n" in text
    assert f"  parent        {mid} (unique id matches)\n" in text
    assert f"parent 2: {base}\n" in text


def test_info_of_broken_chain_reports_what_it_can(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    vhd("create", base, "8M")
    vhd("create", "-p", base, child)
    base.unlink()
    result = vhd("info", child)
    assert result.returncode == 4
    assert f"image: {child}\n" in result.stdout
    assert result.stdout.endswith(
        f"chain incomplete: {child}: parent 'base.vhd' not found; tried: {base}\n"
    )


def test_create_fixed_is_sparse(tmp_path: Path) -> None:
    image = tmp_path / "fixed.vhd"
    assert vhd("create", "-t", "fixed", "--size", "1G", image).returncode == 0
    st = image.stat()
    assert st.st_size == (1 << 30) + 512
    assert st.st_blocks * 512 < 1 << 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["IMAGE", "1000"], "size 1000 is not a positive multiple of 512 bytes"),
        (["IMAGE", "3T"], "size 3298534883328 exceeds the VHD maximum of 2040 GiB"),
        (
            ["-b", "3000", "IMAGE", "1G"],
            "block size 3000 is not a power of two from 512 bytes to 256 MiB",
        ),
        (["-t", "fixed", "-b", "1M", "IMAGE", "1G"], "--block-size does not apply to fixed images"),
        (["IMAGE"], "SIZE is required without --parent"),
        (
            ["IMAGE", "lots"],
            "size: not a size: 'lots' (use a number with an optional K, M, G, T or P)",
        ),
        (
            ["-b", "512", "IMAGE", "2040G"],
            "IMAGE: 4278190080 blocks of 512 bytes would need a 16320 MiB BAT; "
            "choose a larger block size",
        ),
    ],
)
def test_create_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    image = tmp_path / "new.vhd"
    result = vhd("create", *(str(image) if a == "IMAGE" else a for a in args))
    assert result.returncode == 2
    assert result.stderr == f"vhd: {message.replace('IMAGE', str(image))}\n"
    assert not image.exists()


def test_create_never_overwrites(tmp_path: Path) -> None:
    image = tmp_path / "precious.vhd"
    image.write_bytes(b"data")
    result = vhd("create", image, "1M")
    assert result.returncode == 2
    assert result.stderr == f"vhd: {image}: already exists; refusing to overwrite it\n"
    assert image.read_bytes() == b"data"


def test_info_of_damaged_image(tmp_path: Path) -> None:
    image = tmp_path / "noise.vhd"
    image.write_bytes(b"\x01" * 4096)
    result = vhd("info", image)
    assert result.returncode == 3
    assert result.stderr == f"vhd: {image}: not a VHD image: no 'conectix' cookie in the footer\n"
    assert result.stdout == ""


def test_json_is_always_json(tmp_path: Path) -> None:
    noise, qcow2 = tmp_path / "noise.vhd", tmp_path / "disk.qcow2"
    noise.write_bytes(b"\x01" * 4096)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "1M"], check=True)
    for image, code, status in ((noise, "not-a-vhd", 3), (qcow2, "other-format", 3)):
        result = vhd("info", "--json", image)
        assert (result.returncode, result.stderr) == (status, "")
        report = json.loads(result.stdout)
        assert report["version"] == 1
        assert (report["complete"], report["exit_code"], report["layers"]) == (False, status, [])
        assert report["error"]["code"] == code
        assert report["error"]["path"] == str(image)
    assert "qemu-img convert -f qcow2 -O vpc" in report["error"]["message"]
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    vhd("create", base, "8M")
    vhd("create", "-p", base, child)
    base.unlink()
    broken = json.loads(vhd("info", "--json", child).stdout)
    assert (broken["version"], broken["complete"], broken["exit_code"]) == (1, False, 4)
    assert broken["error"]["code"] == "parent-not-found"
    checked = json.loads(vhd("check", "--json", child).stdout)
    assert checked["version"] == 1
    assert [(f["severity"], f["code"]) for f in checked["findings"]] == [
        ("error", "parent-not-found")
    ]


def test_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    vhd("create", image, "8M")
    shell = f"{' '.join(vhd_command())} info --json {image} | true; echo ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() in ("0", "141")  # done before the pipe closed, or SIGPIPE


def test_busy_image_names_the_vhdfs_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    from vhdfs.cli import tools_cmd
    from vhdfs.errors import ImageBusyError

    locked = ImageBusyError("/srv/d.vhd", "cannot lock for writing: in use by another program")
    mounts = {"/srv/d.vhd": "/mnt/my disk"}
    monkeypatch.setattr(tools_cmd, "mount_of", mounts.get)
    named = tools_cmd.name_holder(locked)
    assert (named.path, named.exit_code) == ("/srv/d.vhd", 6)
    assert str(named) == (
        "/srv/d.vhd: in use by the vhdfs mount at /mnt/my disk "
        "(unmount it first: vhdfs -u '/mnt/my disk')"
    )
    # Held by something else (QEMU, another tool): the lock's own message stays.
    other = ImageBusyError("/srv/other.vhd", locked.message)
    assert tools_cmd.name_holder(other) is other
