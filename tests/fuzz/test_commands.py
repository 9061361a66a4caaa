"""A sample of fuzzed inputs through the real commands: documented exit statuses, one line on
stderr for a failure, nothing left mounted, and no file changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.run import make_input
from tests.fuzz.seeds import all_seeds
from tests.fuzz.target import materialize
from tests.support.mounting import Mount, MountFailed, is_mounted, vhd_command

pytestmark = pytest.mark.fuse

SAMPLE = 30
INFO_STATUSES = {0, 3, 4, 7}
CHECK_STATUSES = {0, 1, 2}
MOUNT_STATUSES = {0, 3, 4, 5, 6, 7}
FINDING_PREFIXES = ("error: ", "warning: ", "leak: ")


def _state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def seeds() -> list:
    return all_seeds()


@pytest.mark.parametrize("number", range(SAMPLE))
def test_commands_on_fuzzed_input(number: int, seeds: list, tmp_path: Path) -> None:
    folder = tmp_path / "input"
    leaf = materialize(folder, make_input(seeds, 77, number))
    before = _state(folder)

    info = subprocess.run([*vhd_command(), "info", str(leaf)], capture_output=True, text=True)
    assert info.returncode in INFO_STATUSES, info.stderr
    assert len(info.stderr.splitlines()) == (0 if info.returncode in (0, 4) else 1), info.stderr

    check = subprocess.run([*vhd_command(), "check", str(leaf)], capture_output=True, text=True)
    assert check.returncode in CHECK_STATUSES, check.stderr
    assert check.stderr == ""
    *findings, last = check.stdout.splitlines()
    assert all(line.startswith(FINDING_PREFIXES) for line in findings), check.stdout
    assert last.startswith(FINDING_PREFIXES) or last.startswith(f"{leaf}: no errors")

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = Mount([str(leaf)], str(mountpoint), ["ro"])
    try:
        m.start()
    except MountFailed:
        assert m.returncode in MOUNT_STATUSES, m.stderr
        assert len(m.stderr.decode().splitlines()) == 1, m.stderr
        assert not is_mounted(str(mountpoint))
    else:
        raw = mountpoint / os.listdir(mountpoint)[0]
        size = raw.stat().st_size
        with open(raw, "rb") as f:
            assert len(f.read(64 << 20)) == min(size, 64 << 20)
        assert m.stop() == 0
    finally:
        m.cleanup()
    assert _state(folder) == before
