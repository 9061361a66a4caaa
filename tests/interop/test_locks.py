"""vhdfs and QEMU see each other's locks: readers coexist with readers in both directions,
writers are refused both ways (QEMU's per-permission byte locks, see image/hostfile.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.mounting import Mount, MountFailed
from vhdfs.image.create import create_differencing, create_dynamic

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SHARED_WRITE = 'Failed to get shared "write" lock'
WRITE = 'Failed to get "write" lock'


def _qemu(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, argv)], capture_output=True, text=True, timeout=60)


def _qemu_readers_and_writers(image: Path) -> dict[str, str]:
    """What each kind of QEMU user gets on ``image``: "ok" or its lock error."""
    outcomes = {}
    for name, argv in {
        "info": ["qemu-img", "info", image],
        "info -U": ["qemu-img", "info", "-U", image],
        "convert": [
            "qemu-img",
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            image,
            image.with_suffix(".r"),
        ],
        "read": ["qemu-io", "-r", "-f", "vpc", "-c", "read 0 512", image],
        "write": ["qemu-io", "-f", "vpc", "-c", "write 0 512", image],
    }.items():
        result = _qemu(*argv)
        if result.returncode == 0:
            outcomes[name] = "ok"
        else:
            outcomes[name] = WRITE if WRITE in result.stderr else result.stderr.strip()
            if SHARED_WRITE in result.stderr:
                outcomes[name] = SHARED_WRITE
    return outcomes


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.vhd"
    create_dynamic(str(image), 4 * MiB)
    return image


def test_qemu_against_a_read_write_mount(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = _image(tmp_path)
    m = mount([image])
    assert _qemu_readers_and_writers(image) == {
        "info": SHARED_WRITE,
        "info -U": "ok",
        "convert": SHARED_WRITE,
        "read": SHARED_WRITE,
        "write": WRITE,
    }
    assert m.stop() == 0


def test_qemu_against_a_read_only_mount(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = _image(tmp_path)
    m = mount([image], options=["ro"])
    assert _qemu_readers_and_writers(image) == {
        "info": "ok",
        "info -U": "ok",
        "convert": "ok",
        "read": "ok",
        "write": WRITE,
    }
    assert m.stop() == 0


def test_qemu_against_the_base_of_an_overlay(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = _image(tmp_path)
    m = mount([image], options=[f"overlay={tmp_path / 'try.vhd'}"])
    assert _qemu_readers_and_writers(image)["info"] == "ok"
    assert _qemu_readers_and_writers(image)["write"] == WRITE
    assert _qemu_readers_and_writers(tmp_path / "try.vhd")["info"] == SHARED_WRITE
    assert m.stop() == 0


@contextmanager
def _qemu_holding(image: Path, *, writable: bool) -> Iterator[None]:
    """qemu-io with the image open (read-only or read-write) until the block ends."""
    argv = (
        ["qemu-io", "-f", "vpc", str(image)]
        if writable
        else ["qemu-io", "-r", "-f", "vpc", str(image)]
    )
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write("read 0 512\n")
        process.stdin.flush()
        while "read 512/512 bytes" not in process.stdout.readline():
            assert process.poll() is None, "qemu-io ended"
        yield
    finally:
        process.stdin.write("quit\n")
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


@pytest.mark.parametrize("writable", [False, True])
def test_vhdfs_against_qemu(writable: bool, tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = _image(tmp_path)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(image))
    with _qemu_holding(image, writable=writable):
        for options in (["ro"], ["rw"]):
            refused = writable or options == ["rw"]
            if refused:
                with pytest.raises(MountFailed, match=r"exited 6: .*in use by another program"):
                    mount([image], options=options)
            else:
                assert mount([image], options=options).stop() == 0
        # As a parent, the image is only read: that coexists with a QEMU reader.
        if writable:
            with pytest.raises(MountFailed, match="exited 6"):
                mount([child])
        else:
            assert mount([child]).stop() == 0
