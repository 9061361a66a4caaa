"""The control socket behind ``vhdfs -u``, probed as another local user would.

Abstract socket names belong to whoever binds them first. Another user may bind every name a
daemon could want and answer for it, or never answer: ``vhdfs -u`` must still unmount the real
mount and wait for the real daemon, or fail in one line, and never hang. A client that leaves
in the middle of an unmount must not end the daemon.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.attacker import attacker_user
from tests.support.mounting import VHD, Mount, is_mounted, vhdfs_command, wait_pid
from vhdfs.daemon.mounts import top_mount_at
from vhdfs.image.create import create_dynamic

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20

#: Binds every name given on its command line and answers each connection as a daemon that
#: accepted the unmount and finished (``answer``), holds it without a word (``silent``), or
#: never takes it: a backlog kept full (``full``).
_SQUATTER = r"""
import selectors, socket, sys
mode, names = sys.argv[1], sys.argv[2:]
selector = selectors.DefaultSelector()
for name in names:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind("\0" + name)
    except OSError:
        s.close()
        continue
    if mode == "full":
        # A backlog kept full: a client's connect would wait for room that never comes.
        s.listen(0)
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        filler.connect("\0" + name)
        held_fillers = globals().setdefault("held_fillers", [])
        held_fillers += [s, filler]
        continue
    s.listen(8)
    selector.register(s, selectors.EVENT_READ)
print("ready", flush=True)
held = []
while True:
    for key, _ in selector.select():
        connection, _ = key.fileobj.accept()
        if mode == "answer":
            connection.recv(64)
            connection.sendall(b"unmounting\ndone\t0\n")
            connection.close()
        else:
            held.append(connection)
"""


def _vhdfs(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhdfs_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def _device(mountpoint: str) -> str:
    entry = top_mount_at(mountpoint)
    assert entry is not None
    return entry.device


def test_names_squatted_by_another_user_neither_answer_nor_block(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 8 * MiB)
    with attacker_user() as attacker:
        # Before the mount: every name of the form daemons used to take, answered falsely.
        attacker.start_python(_SQUATTER, ["answer", *(f"vhdfs/0:{n}" for n in range(1, 800))])
        m = mount([image])
        assert m.pid is not None
        device = _device(m.mountpoint)
        # After it: names claiming to be this daemon's, held silently.
        claims = [f"vhdfs/{device}/{m.pid}.0", f"vhdfs/{device}", f"vhdfs/{device}/{m.pid}"]
        attacker.start_python(_SQUATTER, ["silent", *claims])
        # And names the daemon's PID would own, their backlogs full (connect would wait).
        full = [f"vhdfs/{device}/{m.pid}.f{n}" for n in range(40)]
        attacker.start_python(_SQUATTER, ["full", *full])
        result = _vhdfs("-u", m.mountpoint, timeout=90)
        assert (result.returncode, result.stderr) == (0, "")
        # Returned only once the real daemon had exited.
        assert wait_pid(m.pid, 0) == 0
        m.pid = None
        assert not is_mounted(m.mountpoint)


def test_a_client_that_leaves_during_the_unmount_does_not_end_the_daemon(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d.vhd"
    create_dynamic(str(image), 64 * MiB)
    m = mount([image], options=["writeback=3600"])
    data = random.Random(4).randbytes(32 * MiB)
    with open(m.raw("d.raw"), "r+b") as f:
        f.write(data)  # held in memory: the unmount has to write it out
    device = _device(m.mountpoint)
    names = [
        line.split()[7]
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]
        if len(line.split()) > 7 and line.split()[7].startswith(f"@vhdfs/{device}")
    ]
    assert len(names) == 1
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect("\0" + names[0][1:])
    client.sendall(b"unmount\n")
    client.close()  # gone before any answer
    assert m.wait_exited(60) == 0
    assert not is_mounted(m.mountpoint)
    again = mount([image], options=["ro"])
    with open(again.raw("d.raw"), "rb") as f:
        assert f.read(len(data)) == data
    assert again.stop() == 0
    checked = subprocess.run([VHD, "check", image], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


def test_backlogs_kept_full_by_another_user_do_not_stall_the_search() -> None:
    # Names that claim a root process (PID 1) and never take a connection: looking for the
    # daemon of that device skips each at once instead of waiting on it.
    device = "0:1048575"  # no mount has it
    names = [f"vhdfs/{device}/1.f{n}" for n in range(40)]
    probe = (
        "from vhdfs.daemon.control import daemon_alive\n"
        "from vhdfs.daemon.mounts import MountEntry\n"
        f"print(daemon_alive(MountEntry({device!r}, '/nowhere', 'fuse.vhdfs', 'x', 0)))\n"
    )
    with attacker_user() as attacker:
        attacker.start_python(_SQUATTER, ["full", *names])
        listed = Path("/proc/net/unix").read_text()
        assert all(f"@{name}" in listed for name in names)
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
    assert (result.returncode, result.stdout, result.stderr) == (0, "False\n", "")
