"""Every case of the sample corpus, mounted through the real command (manifest contract)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CORPUS, unpack_case
from tests.support.files import sha256_file, tree_hashes
from tests.support.mounting import is_mounted, vhdfs_command

#: What each kind of damage must produce: exit status and a pattern of the one-line error.
ERRORS = {
    "bad_bat": (3, r"BAT entry \d+ = sector \d+.*beyond the end of data"),
    "bad_footer": (3, r"footer checksum 0x[0-9a-f]{8} does not match computed"),
    "parent_loop": (4, r"chain loops|already in the chain"),
    "parent_missing": (4, r"parent '.*' not found; tried: "),
    "truncated": (3, r"truncated"),
}


def _cases() -> list[Any]:
    with open(CORPUS / "manifest.json") as f:
        cases = json.load(f)["cases"]
    return [pytest.param(case, id=case["name"]) for case in cases]


@pytest.mark.fuse
@pytest.mark.parametrize("case", _cases())
def test_corpus_case(case: dict[str, Any], tmp_path: Path, mount: Any) -> None:
    folder = unpack_case(case, tmp_path / "images")
    image = folder / case["mount"]
    before = tree_hashes(folder)
    if case["expect"] == "content":
        if case.get("invoke_relative"):
            # The chain must resolve from the image's folder, not from the caller's.
            m = mount([os.path.relpath(image, tmp_path)], options=["ro"], cwd=tmp_path)
        else:
            m = mount([image], options=["ro"])
        raw = os.path.join(m.mountpoint, case["raw_view"])
        assert os.path.getsize(raw) == case["size"]
        assert sha256_file(raw) == case["sha256"]
        assert m.stop() == 0
    else:
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        result = subprocess.run(
            [*vhdfs_command(), "-o", "ro", str(image), str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = result.stderr.splitlines()
        assert result.returncode != 0
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"vhdfs: {image}: ")
        assert not is_mounted(str(mountpoint))
        if case["error_class"] in ERRORS:
            status, pattern = ERRORS[case["error_class"]]
            assert result.returncode == status, result.stderr
            assert re.search(pattern, lines[0]), lines[0]
    assert tree_hashes(folder) == before
