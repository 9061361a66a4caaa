"""Overlays and the raw file are never more open than the images under them.

With ``allow_other`` the kernel checks a raw file's mode bits for every user: a raw file more
open than a 0600 base would hand the base's data to anyone. An existing overlay that another
user owns or may write is refused: our writes would go into their file.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.attacker import attacker_user
from tests.support.mounting import Mount, vhdfs_command
from vhdfs.image.create import create_differencing, create_dynamic

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20


def _vhdfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhdfs_command(), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_overlay_of_a_private_base_is_private(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    # Mountpoints in a folder every user may pass through: only the modes keep anyone out.
    public = Path(tempfile.mkdtemp(prefix="vhdfs-public-"))
    mounts: list[Mount] = []
    try:
        os.chmod(public, 0o755)
        with attacker_user() as attacker:
            for base_mode, readable in ((0o644, True), (0o600, False)):
                base = tmp_path / f"base{base_mode:o}.vhd"
                create_dynamic(str(base), 8 * MiB)
                os.chmod(base, base_mode)
                overlay = tmp_path / f"try{base_mode:o}.vhd"
                mountpoint = public / f"mnt{base_mode:o}"
                mountpoint.mkdir()
                m = mount([base], mountpoint, [f"overlay={overlay}", "allow_other"])
                mounts.append(m)
                raw = m.raw(f"base{base_mode:o}.raw")
                with open(raw, "r+b") as f:
                    f.write(b"secret" * 100)
                assert _mode(overlay) == base_mode
                assert _mode(raw) == base_mode
                read = attacker.run("head", "-c", "6", raw)
                if readable:
                    assert (read.returncode, read.stdout) == (0, "secret")
                else:
                    assert read.returncode == 1
                    assert read.stderr.endswith(": Permission denied\n")
                assert m.stop() == 0
    finally:
        for started in mounts:
            started.cleanup()  # before the folder goes (after a failure, still mounted)
        shutil.rmtree(public)


def test_a_raw_file_shows_no_more_than_its_least_open_layer(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), 8 * MiB)
    os.chmod(base, 0o640)
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(base))
    os.chmod(child, 0o604)
    m = mount([child], options=["ro"])
    assert _mode(m.raw("child.raw")) == 0o400  # 0640 & 0604, less the write bits
    assert m.stop() == 0


def test_an_overlay_another_user_owns_or_may_write_is_refused(tmp_path: Path) -> None:
    try:
        _refused(tmp_path)
    finally:
        if os.path.ismount(tmp_path / "mnt"):  # accepted after all: its daemon exits with it
            subprocess.run(["fusermount3", "-u", tmp_path / "mnt"], capture_output=True)


def _refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), 8 * MiB)
    overlay = tmp_path / "try.vhd"
    create_differencing(str(overlay), str(base))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = overlay.read_bytes()
    with attacker_user() as attacker:
        os.chown(overlay, attacker.uid, attacker.gid)
        owned = _vhdfs("-o", f"overlay={overlay}", base, mountpoint)
        assert (owned.returncode, owned.stderr) == (
            2,
            f"vhdfs: {overlay}: overlay belongs to another user (uid {attacker.uid}); "
            "use an overlay of your own\n",
        )
        # Refused before its locators are followed: here they lead nowhere.
        stray = tmp_path / "stray.vhd"
        other = tmp_path / "gone.vhd"
        create_dynamic(str(other), 8 * MiB)
        create_differencing(str(stray), str(other))
        other.unlink()
        os.chown(stray, attacker.uid, attacker.gid)
        foreign = _vhdfs("-o", f"overlay={stray}", base, mountpoint)
        assert (foreign.returncode, foreign.stderr) == (
            2,
            f"vhdfs: {stray}: overlay belongs to another user (uid {attacker.uid}); "
            "use an overlay of your own\n",
        )
    os.chown(overlay, 0, 0)
    os.chmod(overlay, 0o664)
    writable = _vhdfs("-o", f"overlay={overlay}", base, mountpoint)
    assert (writable.returncode, writable.stderr) == (
        2,
        f"vhdfs: {overlay}: overlay may be written by other users (group or others have write "
        "permission); use an overlay only you can write\n",
    )
    assert overlay.read_bytes() == before
    assert not os.path.ismount(mountpoint)


def test_an_overlay_under_a_group_writable_umask_is_accepted(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    # umask 002 (user private groups): a 0664 base gives a 0644 overlay, which the check
    # that refuses group-writable overlays then accepts.
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), 8 * MiB)
    os.chmod(base, 0o664)
    overlay = tmp_path / "try.vhd"
    old = os.umask(0o002)
    try:
        m = mount([base], options=[f"overlay={overlay}"])
    finally:
        os.umask(old)
    assert _mode(overlay) == 0o644
    assert m.stop() == 0


def test_a_layer_of_another_group_keeps_its_group_out(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), 8 * MiB)
    os.chmod(base, 0o640)  # root:root
    child = tmp_path / "child.vhd"
    create_differencing(str(child), str(base))
    with attacker_user() as attacker:
        os.chown(child, 0, attacker.gid)
        os.chmod(child, 0o640)  # the attacker's group may read the child, not the base
        m = mount([child], options=["ro"])
        assert _mode(m.raw("child.raw")) == 0o400
        assert m.stop() == 0
