"""The README's "Using vhdfs with mount, fstab, systemd and hypervisors" section, run.

Every command of the section's ``sh`` blocks runs, in order, in one shell, with the absolute
paths it names moved into a scratch folder, ``/etc/fstab`` replaced by a scratch fstab
(``mount -T``), and ``systemd/`` taken from this checkout. ``systemctl`` (no systemd runs as
PID 1 here) and ``qemu-system-x86_64`` (a full guest OS) are the exceptions; the unit and the
QEMU drive options are tested by test_systemd.py and test_hypervisor.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.mounting import is_mounted

pytestmark = [pytest.mark.fuse, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Using vhdfs with mount, fstab, systemd and hypervisors"
NOT_RUN = ("systemctl ", "qemu-system-x86_64 ")
MOVED = ("/srv/", "/mnt/", "/etc/vhdfs", "/etc/systemd/system")


def section_commands() -> list[str]:
    """The command lines of the section's sh blocks (comments stripped), in order."""
    text = (ROOT / "README.md").read_text()
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", body, re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+# .*$", "", line).strip()
            if command:
                lines.append(command)
    return lines


def _localize(command: str, scratch: Path) -> str:
    for prefix in MOVED:
        command = re.sub(rf"(?<![\w.]){re.escape(prefix)}", f"{scratch}{prefix}", command)
    command = command.replace("/etc/fstab", f"{scratch}/fstab")
    if command.startswith("mount ") and "-t " not in command:
        command = command.replace("mount ", f"mount -T {scratch}/fstab ", 1)
    return command


def test_every_command_of_the_section_runs(tmp_path: Path) -> None:
    commands = section_commands()
    assert len(commands) > 10
    run = [c for c in commands if not c.startswith(NOT_RUN)]
    assert {c.split()[0] for c in commands} - {c.split()[0] for c in run} == {
        "systemctl",
        "qemu-system-x86_64",
    }
    script = "set -eux\n" + "\n".join(_localize(c, tmp_path) for c in run) + "\n"
    try:
        result = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        # What the comments promise.
        assert "nobody 600 1073741824" in result.stdout
        assert "srv-vm-disk" in result.stdout
    finally:
        mountpoint = tmp_path / "mnt" / "disk"
        while is_mounted(str(mountpoint)):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
