"""A parent inside a stalled mount: refused with one line naming it, not waited for forever.

The parent lives on ``faultyfs`` (tests/support/faultyfs.py), a FUSE pass-through, whose
daemon is then stopped with SIGSTOP: every lookup under its mountpoint waits in the kernel for
an answer that does not come, as with a hung FUSE daemon or a dead network file system.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.faultyfs import running
from tests.support.mounting import is_mounted, vhd_command
from vhdfs.errors import StalledPathError
from vhdfs.image.bounded import LOOKUP_TIME_LIMIT
from vhdfs.image.chain import Chain
from vhdfs.image.create import create_differencing, create_dynamic

pytestmark = pytest.mark.fuse


@dataclass(frozen=True)
class Stalled:
    """A child outside the mount whose parent lies inside it, and the stopped daemon's PID."""

    child: Path
    parent: Path
    pid: int


@pytest.fixture
def stalled() -> Iterator[Stalled]:
    # A folder of this test's own: nothing else walks it while the mount in it is stalled.
    root = Path(tempfile.mkdtemp(prefix="vhdfs-stalled-", dir="/tmp"))
    backing, mountpoint, control = root / "backing", root / "mnt", root / "faults"
    backing.mkdir()
    mountpoint.mkdir()
    control.write_text("")
    try:
        with running(backing, mountpoint, control) as process:
            create_dynamic(str(backing / "base.vhd"), 4 << 20)
            child = root / "child.vhd"
            create_differencing(str(child), str(mountpoint / "base.vhd"))
            os.kill(process.pid, signal.SIGSTOP)
            try:
                yield Stalled(child, mountpoint / "base.vhd", process.pid)
            finally:
                os.kill(process.pid, signal.SIGCONT)  # so that it can be stopped
    finally:
        if not is_mounted(str(mountpoint)):
            shutil.rmtree(root, ignore_errors=True)


def test_parent_in_a_stalled_mount(stalled: Stalled) -> None:
    message = (
        f"{stalled.parent}: no answer within {{}} s (a stalled mount?), looking for the parent "
        f"of {stalled.child}"
    )
    with pytest.raises(StalledPathError) as caught:
        Chain.open(str(stalled.child), time_limit=0.5)
    assert str(caught.value) == message.format("0.5")
    # The real command, with its default limit; the timeout only guards against a hang.
    result = subprocess.run(
        [*vhd_command(), "info", str(stalled.child)],
        capture_output=True,
        text=True,
        timeout=LOOKUP_TIME_LIMIT + 50,
    )
    assert (result.returncode, result.stdout) == (7, "")
    assert result.stderr == f"vhd: {message.format(f'{LOOKUP_TIME_LIMIT:g}')}\n"
