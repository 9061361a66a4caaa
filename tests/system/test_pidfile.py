"""``-o pidfile=`` in a folder another user may write: nothing is followed, nothing is left.

The folder is group-writable without the sticky bit, so the kernel's ``protected_symlinks``
does not protect it (the test holds whatever that setting is). The attacker plants symlinks
at the pidfile's name and at every name a temporary file could predictably take.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.attacker import attacker_user
from tests.support.mounting import Mount, vhdfs_command
from vhdfs.image.create import create_dynamic

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20

_PLANT = r"""
import os, sys
folder, target, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.symlink(target, os.path.join(folder, "d.pid"))
for pid in range(first, first + count):
    os.symlink(target, os.path.join(folder, f"d.pid.{pid}.tmp"))
print("ready", flush=True)
"""


def test_planted_symlinks_are_not_followed(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 8 * MiB)
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    with attacker_user() as attacker:
        shared = attacker.home / "run"
        shared.mkdir()
        os.chown(shared, 0, attacker.gid)
        os.chmod(shared, 0o775)  # group-writable, no sticky bit
        pidfile = shared / "d.pid"
        last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
        attacker.start_python(_PLANT, [str(shared), str(secret), str(last + 1), "3000"])
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        m = mount([image], mountpoint, [f"pidfile={pidfile}"], foreground=True)
        deadline = time.monotonic() + 30
        while os.path.islink(pidfile) and time.monotonic() < deadline:
            time.sleep(0.02)  # -f: written right after the mount appeared
        assert secret.read_text() == "root only\n"
        assert stat.S_ISREG(os.lstat(pidfile).st_mode)
        assert os.lstat(pidfile).st_uid == 0
        assert pidfile.read_text() == f"{m.pid}\n"
        planted = {f"d.pid.{pid}.tmp" for pid in range(last + 1, last + 3001)}
        assert set(os.listdir(shared)) == {"d.pid"} | planted
        assert m.stop() == 0
        assert not pidfile.exists()
        assert secret.read_text() == "root only\n"


def test_a_pidfile_that_is_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 8 * MiB)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "run" / "d.pid").mkdir(parents=True)
    result = subprocess.run(
        [*vhdfs_command(), "-o", f"pidfile={tmp_path / 'run' / 'd.pid'}", image, tmp_path / "mnt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (
        2,
        f"vhdfs: {tmp_path / 'run' / 'd.pid'}: pidfile: is a directory\n",
    )
    assert os.listdir(tmp_path / "run") == ["d.pid"]
