"""systemd: the units verify cleanly with a realistic instance, and the daemon speaks the
notify protocol (READY=1 once the raw file reads, STATUS=, STOPPING=1 with everything written).
Also the manual pages and the bash completion that set-up installs."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain, pattern, run
from tests.support.mounting import Mount
from tests.support.notify import NotifySocket
from vhdfs.cli.vhd_cmd import build_parser

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True
    )


def test_units_verify_cleanly(tmp_path: Path) -> None:
    # A mountpoint with a space and a dash, escaped as systemd escapes it.
    instance = run(["systemd-escape", "--path", "/srv/vm disks/disk-1"]).strip()
    assert instance == "srv-vm\\x20disks-disk\\x2d1"
    template = tmp_path / "vhdfs@.service"
    template.write_text((ROOT / "systemd" / "vhdfs@.service").read_text())
    unit = tmp_path / f"vhdfs@{instance}.service"
    unit.symlink_to(template.name)
    result = _verify(unit)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    for name in ("mnt-disk.mount", "mnt-disk.automount"):
        (tmp_path / name).write_text((ROOT / "systemd" / name).read_text())
    result = _verify(tmp_path / "mnt-disk.mount", tmp_path / "mnt-disk.automount")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.fuse
def test_notify_protocol(tmp_path: Path, mount: Callable[..., Mount]) -> None:
    built = build_chain(tmp_path / "img", 8 * MiB, [Layer(writes=[(0, 64), (9000, 100)])])
    notify = NotifySocket(tmp_path / "notify")
    m = mount(
        [built.leaf],
        options=["writeback=3600"],
        foreground=True,
        env={"NOTIFY_SOCKET": notify.path},
    )
    notify.wait_for("READY", "1")
    raw = Path(m.raw("layer0.raw"))
    assert raw.read_bytes() == bytes(built.expected)  # ready means readable
    data = pattern(3, 2 * MiB)
    with open(raw, "r+b") as f:
        f.seek(MiB)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        f.seek(5 * MiB)
        f.write(data)  # held in memory (writeback=3600) when the signal comes
    built.expected[MiB : 3 * MiB] = data
    built.expected[5 * MiB : 7 * MiB] = data
    assert notify.wait_for("STATUS", "serving 1 disk(s), *")
    assert m.pid is not None
    os.kill(m.pid, signal.SIGTERM)
    notify.wait_for("STOPPING", "1")
    assert m.wait_exited() == 0
    notify.close()
    again = mount([built.leaf], options=["ro"])
    assert Path(again.raw("layer0.raw")).read_bytes() == bytes(built.expected)
    assert again.stop() == 0


def test_manual_pages_are_installed() -> None:
    for page, text in (("vhdfs", "vhdfs -u"), ("vhd", "vhd check")):
        assert run(["man", "-w", page]).strip().endswith(f"man1/{page}.1")
        rendered = subprocess.run(
            ["man", page], capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80"}
        ).stdout
        assert text in rendered.replace("\u2010", "-").replace("\u2212", "-")


def _complete(line: str) -> list[str]:
    words = line.split(" ")
    script = (
        "source /usr/share/bash-completion/bash_completion; "
        f"source {ROOT / 'data' / 'bash-completion' / 'vhd'}; "
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; "
        f"COMP_POINT={len(line)}; _vhd; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return sorted(result.stdout.split())


def test_bash_completion_knows_every_command() -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    commands = sorted(subparsers.choices)  # type: ignore[union-attr]
    assert [word for word in _complete("vhd ''") if not word.startswith("-")] == commands
    assert _complete("vhd c") == [c for c in commands if c.startswith("c")]
    assert _complete("vhd create -t ''") == ["dynamic", "fixed"]
    assert "--json" in _complete("vhd info -")
