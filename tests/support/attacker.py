"""A second local user for the tests that probe vhdfs as an attacker would.

The user is made for the test (``useradd``) and removed after it, with whatever processes the
test started as that user killed by PID. Its programs run with Debian's own Python
(``/usr/bin/python3``) from a folder it can read, never from the checkout, which may sit in a
folder only root may enter.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Attacker:
    """A throw-away unprivileged user, and a folder of its own for its programs."""

    name: str
    uid: int
    gid: int
    home: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, *argv: str | Path) -> list[str]:
        """``argv`` run as this user."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--", *map(str, argv)]  # fmt: skip

    def run(self, *argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user to completion."""
        return subprocess.run(
            self.argv(*argv), capture_output=True, text=True, timeout=timeout, cwd=self.home
        )

    def start_python(self, source: str, args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start a Python program as this user; its first line of output is awaited."""
        script = self.home / f"program{len(self.started)}.py"
        script.write_text(source)
        os.chmod(script, 0o644)
        process = subprocess.Popen(
            self.argv(SYSTEM_PYTHON, script, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.home,
        )
        self.started.append(process)
        assert process.stdout is not None
        ready = process.stdout.readline()
        if not ready:
            raise AssertionError(f"the attacker's program failed: {process.stderr.read()!r}")
        return process

    def stop_all(self) -> None:
        """Kill every process this object started (by PID) and reap it."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=10)


@contextlib.contextmanager
def attacker_user() -> Iterator[Attacker]:
    """A new unprivileged user (no login, no home of its own), removed afterwards."""
    name = f"vhdfsatk{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(name)
    home = Path(tempfile.mkdtemp(prefix="vhdfs-attacker-"))
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o755)
    attacker = Attacker(name, entry.pw_uid, entry.pw_gid, home)
    try:
        yield attacker
    finally:
        attacker.stop_all()
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True)
