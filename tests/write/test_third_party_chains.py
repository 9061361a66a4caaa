"""Writes into copies of the corpus's differencing chains (made by blktap's vhd-util and
MiniVHD): only the written bytes change, everything else still reads the parents' bytes, in
vhdfs and in vhdimount, and the parent files stay byte for byte what they were."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CORPUS, unpack_case
from tests.support.files import sha256_file
from tests.support.images import pattern, run
from tests.support.mounting import Mount, read_with_vhdimount, vhd_command

pytestmark = pytest.mark.fuse


def _chains() -> list[Any]:
    with open(CORPUS / "manifest.json") as f:
        cases = json.load(f)["cases"]
    return [
        pytest.param(case, id=case["name"])
        for case in cases
        if case["expect"] == "content" and len(case["files"]) > 1
    ]


def _vhdimount_view(image: Path, mountpoint: Path) -> bytes | None:
    mountpoint.mkdir(exist_ok=True)
    try:
        return read_with_vhdimount(str(image), str(mountpoint))
    except AssertionError:
        return None  # vhdimount only finds parents named in the child's own folder


@pytest.mark.parametrize("case", _chains())
def test_writes_into_third_party_chain(
    case: dict[str, Any], tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    folder = unpack_case(case, tmp_path / "images")
    leaf = folder / case["mount"]
    parents = [folder / name for name in case["files"] if folder / name != leaf]
    parent_hashes = {p: sha256_file(p) for p in parents}
    theirs_before = _vhdimount_view(leaf, tmp_path / "vhdi")
    m = mount([leaf])
    raw = Path(m.raw(case["raw_view"]))
    expected = bytearray(raw.read_bytes())
    size = len(expected)
    # Whole 4 KiB pages (whole bitmap bytes), inside and across blocks the parents hold.
    writes = [(4096, 4096), (2 * 1024 * 1024 - 8192, 16384), (size - 4096, 4096)]
    with open(raw, "r+b") as f:
        for number, (offset, length) in enumerate(writes):
            data = pattern(900 + number, length)
            f.seek(offset)
            f.write(data)
            expected[offset : offset + length] = data
    assert m.stop() == 0
    assert {p: sha256_file(p) for p in parents} == parent_hashes
    assert "no errors" in run([*vhd_command(), "check", leaf])
    again = mount([leaf], options=["ro"])
    assert Path(again.raw(case["raw_view"])).read_bytes() == bytes(expected)
    assert again.stop() == 0
    theirs_after = _vhdimount_view(leaf, tmp_path / "vhdi")
    if theirs_before is None:
        assert theirs_after is None
    else:
        changed = bytearray(theirs_before)
        for offset, length in writes:
            changed[offset : offset + length] = expected[offset : offset + length]
        assert theirs_after == bytes(changed)
