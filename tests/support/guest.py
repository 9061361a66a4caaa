"""Boot the tiny guest of scripts/build-guest.sh under QEMU (TCG) with one virtio disk.

Each boot appends a second cpio archive to the base initramfs holding ``/test.sh`` (run with
``sh -e`` by the guest's init) and any data files; the guest powers off when the script ends,
and its console tells how the script ended (``GUEST: rc=N``).
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

GUEST = Path(__file__).resolve().parents[2] / ".cache" / "guest"


def _newc_member(name: str, data: bytes, mode: int, number: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [number, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def cpio(files: dict[str, bytes]) -> bytes:
    """A gzipped newc archive of regular files (scripts executable)."""
    members = [
        _newc_member(name, data, 0o100755 if name.endswith(".sh") else 0o100644, number)
        for number, (name, data) in enumerate(files.items(), 1)
    ]
    members.append(_newc_member("TRAILER!!!", b"", 0, 0))
    return gzip.compress(b"".join(members))


def boot(
    disk: str, script: str, workdir: Path, *, cache: str, files: dict[str, bytes] | None = None
) -> str:
    """Boot the guest with ``disk`` as /dev/vda and run ``script``; return the console log.

    Raises:
        AssertionError: QEMU failed, or the script did not end with status 0.
    """
    initrd = workdir / "initrd"
    extra = cpio({"test.sh": script.encode(), **(files or {})})
    initrd.write_bytes((GUEST / "initrd.cpio.gz").read_bytes() + extra)
    console = workdir / "console.log"
    machine = "-accel tcg -machine pc -m 256 -smp 1 -nodefaults -no-user-config"
    argv = ["qemu-system-x86_64", *machine.split(), "-display", "none", "-no-reboot"]
    argv += ["-chardev", f"file,id=console,path={console}", "-serial", "chardev:console"]
    argv += ["-kernel", str(GUEST / "vmlinuz"), "-initrd", str(initrd)]
    argv += ["-append", "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off"]
    argv += ["-drive", f"file={disk},format=raw,if=virtio,cache={cache}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    log = console.read_text(errors="replace")
    if result.returncode != 0 or "GUEST: rc=0" not in log:
        raise AssertionError(f"guest failed (qemu {result.returncode}): {result.stderr}\n{log}")
    return log
