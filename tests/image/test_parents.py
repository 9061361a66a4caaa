"""Files a child names but that are not its parent, parents confined to a folder, stalled lookups.

A locator may name any file the user can read: what the refusal says about such a file must be
no more than its path and a general reason (never its unique id, size or why it is not a VHD).
``parents=DIR`` (``vhd ... --parents DIR``) opens no candidate whose real path lies outside DIR.
Each lookup and open is bounded in time; the stalled FUSE mount itself is
``tests/image/test_stalled.py``.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.craft import unique_id_of
from tests.support.mounting import is_mounted, vhd_command, vhdfs_command
from tests.support.vhdwrite import rewrite_header
from vhdfs.daemon.options import parse_mount_options
from vhdfs.errors import (
    FormatError,
    ImageAccessError,
    ParentIdMismatchError,
    ParentNotFoundError,
    StalledPathError,
    UsageError,
)
from vhdfs.image import chain as chain_module
from vhdfs.image.bounded import LOOKUP_TIME_LIMIT, bounded
from vhdfs.image.chain import Chain
from vhdfs.image.create import create_differencing, create_dynamic
from vhdfs.image.hostfile import HostFile

MiB = 1 << 20
SIZE = 4 * MiB
#: The size of the file put where the parent was: it must not show in any message.
OTHER_SIZE = 24 * MiB


def _run(command: list[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=60)


def _chain(child_dir: Path, base_dir: Path) -> tuple[Path, Path]:
    """``base_dir/base.vhd`` and its child ``child_dir/child.vhd``."""
    child_dir.mkdir(parents=True, exist_ok=True)
    base_dir.mkdir(parents=True, exist_ok=True)
    base = base_dir / "base.vhd"
    child = child_dir / "child.vhd"
    create_dynamic(str(base), SIZE)
    create_differencing(str(child), str(base))
    return base, child


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path ``HostFile.open`` is asked to open, from now on."""
    paths: list[str] = []
    original = HostFile.open.__func__  # type: ignore[attr-defined]

    def recording(cls: type[HostFile], path: str, *, writable: bool) -> HostFile:
        paths.append(path)
        result: HostFile = original(cls, path, writable=writable)
        return result

    monkeypatch.setattr(HostFile, "open", classmethod(recording))
    return paths


# -- what a refusal says about a file that is not the parent -------------------------------


@pytest.fixture
def impostor(tmp_path: Path) -> tuple[Path, Path, str]:
    """A child whose parent's place holds another VHD (another id, another size).

    Returns the child, the other VHD, and the message refusing the chain.
    """
    base, child = _chain(tmp_path, tmp_path)
    base.unlink()
    create_dynamic(str(base), OTHER_SIZE)
    message = (
        f"{child}: parent 'base.vhd' not found: {base} is a VHD, but its unique id is not the "
        "one this image records"
    )
    return child, base, message


def _says_nothing_about(text: str, other: Path) -> None:
    assert unique_id_of(other).hex() not in text
    assert str(OTHER_SIZE) not in text
    assert "24 MiB" not in text
    assert "dynamic" not in text


def test_other_vhd_in_the_parents_place_is_named_not_described(
    impostor: tuple[Path, Path, str],
) -> None:
    child, other, message = impostor
    with pytest.raises(ParentIdMismatchError) as caught:
        Chain.open(str(child))
    assert str(caught.value) == message
    _says_nothing_about(str(caught.value), other)


def test_vhdfs_names_the_other_vhd_only(impostor: tuple[Path, Path, str], tmp_path: Path) -> None:
    child, _, message = impostor
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _run(vhdfs_command(), child, mountpoint)
    assert (result.returncode, result.stdout, result.stderr) == (4, "", f"vhdfs: {message}\n")
    assert not is_mounted(str(mountpoint))


def test_vhd_info_names_the_other_vhd_only(impostor: tuple[Path, Path, str]) -> None:
    child, other, message = impostor
    for args in (["info"], ["info", "--json"]):
        result = _run(vhd_command(), *args, child)
        assert result.returncode == 4
        _says_nothing_about(result.stdout + result.stderr, other)
    result = _run(vhd_command(), "info", child)
    assert result.stdout.splitlines()[-1] == f"chain incomplete: {message}"


def test_vhd_check_names_the_other_vhd_only(impostor: tuple[Path, Path, str]) -> None:
    child, _, message = impostor
    result = _run(vhd_command(), "check", child)
    assert (result.returncode, result.stdout, result.stderr) == (1, f"error: {message}\n", "")


def test_file_that_is_no_vhd_is_not_described(tmp_path: Path) -> None:
    base, child = _chain(tmp_path, tmp_path)
    base.write_bytes(b"secret\n")  # a file too small to be a VHD: its size must not show
    expected = f"{child}: parent 'base.vhd' not found; tried: {base} (not a usable VHD)"
    with pytest.raises(ParentNotFoundError) as caught:
        Chain.open(str(child))
    assert str(caught.value) == expected
    result = _run(vhd_command(), "check", child)
    assert (result.returncode, result.stdout) == (1, f"error: {expected}\n")


def test_damaged_parent_is_still_described(tmp_path: Path) -> None:
    # Its footer carries the id the child records: it is the parent, and the detail helps.
    base, child = _chain(tmp_path, tmp_path)
    rewrite_header(base, {24: struct.pack(">I", 0x00020000)})
    with pytest.raises(FormatError) as caught:
        Chain.open(str(child))
    assert str(caught.value).startswith(f"{base}: dynamic header ")
    assert "0x00020000" in str(caught.value)


# -- parents=DIR ------------------------------------------------------------------------------


def test_parent_outside_the_folder_is_not_opened(tmp_path: Path, opened: list[str]) -> None:
    # The child's relative locator is ..\out\base.vhd: `..` leads out of the folder.
    base, child = _chain(tmp_path / "in", tmp_path / "out")
    folder = tmp_path / "in"
    opened.clear()
    with pytest.raises(ParentNotFoundError) as caught:
        Chain.open(str(child), parents=str(folder))
    assert str(caught.value) == (
        f"{child}: parent 'base.vhd' not found; tried: {base} (outside {folder}; not opened), "
        f"{folder / 'base.vhd'}"
    )
    assert str(base) not in opened
    assert opened == [str(child)]


def test_every_candidate_outside_the_folder(tmp_path: Path, opened: list[str]) -> None:
    base, child = _chain(tmp_path, tmp_path)
    folder = tmp_path / "parents"
    folder.mkdir()
    opened.clear()
    with pytest.raises(ParentNotFoundError) as caught:
        Chain.open(str(child), parents=str(folder))
    assert str(caught.value) == (
        f"{child}: parent 'base.vhd' not found inside {folder}: every candidate lies outside "
        f"it and was not opened: {base}"
    )
    assert opened == [str(child)]


def test_symbolic_link_inside_the_folder_to_a_parent_outside(
    tmp_path: Path, opened: list[str]
) -> None:
    folder = tmp_path / "in"
    outside = tmp_path / "out"
    folder.mkdir()
    outside.mkdir()
    create_dynamic(str(outside / "base.vhd"), SIZE)
    link = folder / "base.vhd"
    link.symlink_to(outside / "base.vhd")
    child = folder / "child.vhd"
    create_differencing(str(child), str(link))
    Chain.open(str(child)).close()  # unconfined, the link is followed
    opened.clear()
    with pytest.raises(ParentNotFoundError) as caught:
        Chain.open(str(child), parents=str(folder))
    assert str(caught.value) == (
        f"{child}: parent 'base.vhd' not found inside {folder}: every candidate lies outside "
        f"it and was not opened: {link}"
    )
    assert opened == [str(child)]


def test_chain_inside_the_folder_opens(tmp_path: Path) -> None:
    base, child = _chain(tmp_path / "images" / "in", tmp_path / "images" / "out")
    folder = tmp_path / "images"
    chain = Chain.open(str(child), parents=str(folder))
    try:
        assert [layer.path for layer in chain.layers] == [str(child), str(base)]
    finally:
        chain.close()
    # The folder itself may be reached through a symbolic link.
    alias = tmp_path / "alias"
    alias.symlink_to(folder)
    Chain.open(str(child), parents=str(alias)).close()
    result = _run(vhd_command(), "info", "--parents", folder, child)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"parent 1: {base}" in result.stdout.splitlines()
    result = _run(vhd_command(), "check", "--parents", folder, child)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, Path, str]:
    """A child in ``in/`` whose parent lies in ``out/``; the refusal under ``parents=in``."""
    base, child = _chain(tmp_path / "in", tmp_path / "out")
    folder = tmp_path / "in"
    message = (
        f"{child}: parent 'base.vhd' not found; tried: {base} (outside {folder}; not opened), "
        f"{folder / 'base.vhd'}"
    )
    return child, folder, message


def test_vhdfs_refuses_a_parent_outside_the_folder(
    outside: tuple[Path, Path, str], tmp_path: Path
) -> None:
    child, folder, message = outside
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _run(vhdfs_command(), "-o", f"ro,parents={folder}", child, mountpoint)
    assert (result.returncode, result.stdout, result.stderr) == (4, "", f"vhdfs: {message}\n")
    assert not is_mounted(str(mountpoint))


def test_vhd_info_and_check_refuse_a_parent_outside_the_folder(
    outside: tuple[Path, Path, str],
) -> None:
    child, folder, message = outside
    result = _run(vhd_command(), "info", "--parents", folder, child)
    assert result.returncode == 4
    assert result.stdout.splitlines()[-1] == f"chain incomplete: {message}"
    result = _run(vhd_command(), "check", "--parents", folder, child)
    assert (result.returncode, result.stdout, result.stderr) == (1, f"error: {message}\n", "")


@pytest.mark.parametrize("command", ["convert", "commit"])
def test_tools_refuse_a_parent_outside_the_folder(
    command: str, outside: tuple[Path, Path, str], tmp_path: Path
) -> None:
    child, folder, message = outside
    before = child.read_bytes()
    extra = [tmp_path / "flat.vhd"] if command == "convert" else []
    result = _run(vhd_command(), command, "--parents", folder, child, *extra)
    assert (result.returncode, result.stdout, result.stderr) == (4, "", f"vhd: {message}\n")
    assert child.read_bytes() == before
    assert not (tmp_path / "flat.vhd").exists()


def test_parents_must_be_a_folder(tmp_path: Path) -> None:
    _, child = _chain(tmp_path, tmp_path)
    missing = tmp_path / "nothing"
    with pytest.raises(UsageError) as caught:
        Chain.open(str(child), parents=str(missing))
    assert str(caught.value) == f"{missing}: not a folder, so parents cannot be confined to it"


def test_parents_option() -> None:
    assert parse_mount_options(["ro,parents=/srv/images"]).disk.parents == "/srv/images"
    assert parse_mount_options(["parents=images"]).disk.parents == os.path.abspath("images")
    assert parse_mount_options([]).disk.parents is None
    with pytest.raises(UsageError) as caught:
        parse_mount_options(["parents="])
    assert str(caught.value) == "parents= needs the folder parents must lie in"


# -- time limits --------------------------------------------------------------------------------


def test_bounded_returns_and_raises_what_the_work_does() -> None:
    assert bounded(lambda: 42, path="/x") == 42

    def fail() -> None:
        raise ImageAccessError("/x", "cannot open: no such file (it is missing)")

    with pytest.raises(ImageAccessError) as caught:
        bounded(fail, path="/x")
    assert str(caught.value) == "/x: cannot open: no such file (it is missing)"
    assert LOOKUP_TIME_LIMIT == 10.0


def test_work_without_an_answer_is_abandoned_and_closed_later() -> None:
    answer = threading.Event()
    closed: list[str] = []
    closing = threading.Event()

    def stuck() -> str:
        answer.wait()
        return "descriptor"

    def discard(result: str) -> None:
        closed.append(result)
        closing.set()

    with pytest.raises(StalledPathError) as caught:
        bounded(stuck, path="/net/base.vhd", limit=0.01, discard=discard, purpose="its parent")
    assert str(caught.value) == (
        "/net/base.vhd: no answer within 0.01 s (a stalled mount?), looking for its parent"
    )
    assert caught.value.exit_code == 7
    assert closed == []
    answer.set()
    assert closing.wait(60)
    assert closed == ["descriptor"]


@pytest.fixture
def stuck_lookup(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Looking up a path named ``base.vhd`` waits until the event is set."""
    answer = threading.Event()
    real = chain_module._exists

    def exists(path: str) -> bool:
        if os.path.basename(path) == "base.vhd":
            answer.wait()
        return real(path)

    monkeypatch.setattr(chain_module, "_exists", exists)
    try:
        yield answer
    finally:
        answer.set()


def test_parent_without_an_answer_is_reported(
    tmp_path: Path, stuck_lookup: threading.Event
) -> None:
    base, child = _chain(tmp_path / "in", tmp_path / "out")
    with pytest.raises(StalledPathError) as caught:
        Chain.open(str(child), time_limit=0.01)
    assert str(caught.value) == (
        f"{base}: no answer within 0.01 s (a stalled mount?), looking for the parent of {child}"
    )
