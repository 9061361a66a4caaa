"""systemd: the units verify cleanly with a realistic instance, the service's hardening rates
3.5 or better without a mount namespace, and the daemon speaks the notify protocol (READY=1 once
the raw file reads, STATUS=, STOPPING=1 with everything written). Also the manual pages and the
bash completion of vhd and vhdfs that set-up installs."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import Layer, build_chain, pattern, run
from tests.support.mounting import Mount
from tests.support.notify import NotifySocket
from vhdfs.cli.mount_cmd import build_parser as vhdfs_parser
from vhdfs.cli.vhd_cmd import build_parser
from vhdfs.daemon.options import PASS_THROUGH_FLAGS, PASS_THROUGH_KEYS, parse_mount_options

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


def _complete(line: str, program: str = "vhd", cwd: Path | None = None) -> list[str]:
    # Words split as bash splits them for completion: at spaces, and around each '='.
    line = " ".join("" if word == "''" else word for word in line.split(" "))
    words = [w for word in line.split(" ") for w in re.split(r"(=)", word)]
    words = [w for i, w in enumerate(words) if w or i == len(words) - 1]
    quoted = " ".join(shlex.quote(w) for w in words)
    script = (
        "source /usr/share/bash-completion/bash_completion; "
        f"source {ROOT / 'data' / 'bash-completion' / program}; "
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMP_LINE={shlex.quote(line)}; "
        f"COMP_POINT={len(line)}; _{program}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, cwd=cwd
    )
    return sorted(result.stdout.split())


def test_bash_completion_knows_every_command() -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    commands = sorted(subparsers.choices)  # type: ignore[union-attr]
    assert [word for word in _complete("vhd ''") if not word.startswith("-")] == commands
    assert _complete("vhd c") == [c for c in commands if c.startswith("c")]
    assert _complete("vhd create -t ''") == ["dynamic", "fixed"]
    assert "--json" in _complete("vhd info -")
    for command, parser in subparsers.choices.items():  # type: ignore[union-attr]
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert set(_complete(f"vhd {command} -")) == flags, command


def _mount_option_words() -> set[str]:
    """The -o words of vhdfs --help (each key= for an option with a value), and every FUSE
    flag and key vhdfs passes through."""
    epilog = str(vhdfs_parser().epilog)
    section = epilog.split("mount options", 1)[1].split("\n  defaults,", 1)[0]  # then: ignored
    words = set()
    for line in section.splitlines()[1:]:
        names = re.match(r"  (\S.*?)(?:\s{2,}|$)", line)  # the first column
        if not names:
            continue
        for item in names.group(1).rstrip(",").split(", "):
            key, equals, _ = item.partition("=")
            words.add(key + equals)
    return words | PASS_THROUGH_FLAGS | {f"{key}=" for key in PASS_THROUGH_KEYS}


def test_bash_completion_of_vhdfs(tmp_path: Path) -> None:
    flags = [flag for action in vhdfs_parser()._actions for flag in action.option_strings]
    assert _complete("vhdfs -", "vhdfs") == sorted(flags)
    offered = _complete("vhdfs -o ''", "vhdfs")
    assert set(offered) == _mount_option_words()
    values = {"overlay": "/tmp/o.vhd", "pidfile": "/tmp/p", "io": "auto", "fsname": "x"}
    values |= {"parents": "/srv"}
    values |= {"uid": "0", "gid": "0", "umask": "022", "subtype": "x", "writeback": "5"}
    for word in offered:  # every word offered is one vhdfs accepts
        key = word.rstrip("=")
        parse_mount_options([f"{key}={values.get(key, '1M')}" if word.endswith("=") else key])
    # After a comma the next word; after '=' (a word break for readline) only the value.
    assert _complete("vhdfs -o ro,part", "vhdfs") == ["ro,partitions"]
    assert _complete("vhdfs -o ro,io=th", "vhdfs") == ["thread"]
    assert _complete("vhdfs -o uid=0,io=", "vhdfs") == ["auto", "inline", "thread"]
    assert _complete("vhdfs -o uid=roo", "vhdfs") == ["root"]
    (tmp_path / "disk.vhd").touch()
    (tmp_path / "notes.txt").touch()
    (tmp_path / "mnt").mkdir()
    assert _complete("vhdfs -o ro ''", "vhdfs", tmp_path) == ["disk.vhd", "mnt"]
    assert _complete("vhdfs disk.vhd ''", "vhdfs", tmp_path) == ["disk.vhd", "mnt", "notes.txt"]
    assert _complete("vhdfs -o overlay=no", "vhdfs", tmp_path) == ["notes.txt"]
    assert _complete("vhdfs -o ro,parents=", "vhdfs", tmp_path) == ["mnt"]


def test_service_hardening_score(tmp_path: Path) -> None:
    # systemd-analyze rates the unit file as it stands (--offline: no systemd needs to run).
    template = tmp_path / "vhdfs@.service"
    template.write_text((ROOT / "systemd" / "vhdfs@.service").read_text())
    (tmp_path / "vhdfs@mnt-disk.service").symlink_to(template.name)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", "vhdfs@mnt-disk.service"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    found = re.search(
        r"Overall exposure level for vhdfs@mnt-disk\.service: (\d+\.\d)", result.stdout
    )
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 3.5
    # What keeps the mount visible to the host: no option that brings a mount namespace.
    for line in template.read_text().splitlines():
        key = line.partition("=")[0]
        assert key not in NAMESPACED, line


#: Options that give a service a mount (or network) namespace of its own: a FUSE mount made
#: in one would be invisible outside the service.
NAMESPACED = {
    "PrivateMounts", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateUsers",
    "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths",
    "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "MountFlags",
}  # fmt: skip
