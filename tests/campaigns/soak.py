"""The soak: fio with verification over a depth-3 chain for half an hour, remounting each phase.

    .venv/bin/python -m tests.campaigns.soak [--minutes 30] [--phase-mib 1024]

Each phase mounts the chain's leaf read-write, reads the whole disk (the page cache dropped, so
the daemon answers) and checks it against the SHA-256 taken before the last unmount, then runs
fio: 4 jobs, each on its own quarter of the disk with its own block size (4, 16, 64, 128 KiB),
mixing random reads and writes with an fsync every 16 writes, every block written checked
(``verify=crc32c`` with ``verify_backlog``, ``O_DIRECT`` so the daemon answers). Then it takes
the disk's SHA-256 again, unmounts and checks the image with ``vhd check``: what was written
must survive the remount, bit for bit. (fio's own ``verify_only`` replay was tried for that and
found unreliable with mixed random reads and writes: it verified a block the write run had only
read.) The daemon's RSS is sampled five times a second. Prints one line per phase and a summary;
exits 1 on any mismatch, fio error, finding or an RSS that grew by more than 32 MiB from the
first phase to the last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.campaigns import stop_cleanly_on_signals
from tests.support.images import Layer, build_chain
from tests.support.mounting import Mount, become_subreaper, vhd_command

MiB = 1 << 20
SIZE = 1024 * MiB


class RssSampler(threading.Thread):
    """Samples ``VmRSS`` of one process five times a second until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.samples.append(int(line.split()[1]) * 1024)
            except FileNotFoundError:
                return
            if self.done.wait(0.2):
                return


def disk_digest(raw: str) -> bytes:
    """SHA-256 of the whole disk as the daemon serves it (the page cache dropped first)."""
    digest = hashlib.sha256()
    fd = os.open(raw, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := os.read(fd, 4 * MiB):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.digest()


def fio(raw: str, seed: int, phase_bytes: int) -> dict[str, int]:
    """One fio run over ``raw``; its bytes read, written and errors."""
    # One block size per job: with mixed sizes random blocks overlap, and fio cannot verify a
    # block a later, larger one overwrote.
    argv = [
        "fio",
        f"--filename={raw}",
        f"--size={phase_bytes // 4}",
        "--rw=randrw",
        "--rwmixread=40",
        "--ioengine=psync",
        "--direct=1",  # verify reads must come from the daemon, not the page cache
        "--fsync=16",
        "--verify=crc32c",
        "--verify_backlog=64",
        "--verify_state_save=0",  # no state files left in the working directory
        f"--randseed={seed}",
        "--group_reporting",
        "--output-format=json",
    ]
    for job, block in enumerate(("4k", "16k", "64k", "128k")):
        argv += [f"--name=soak{job}", f"--bs={block}", f"--offset={job * SIZE // 4}"]
    result = subprocess.run(argv, capture_output=True, text=True)
    report = json.loads(result.stdout[result.stdout.index("{") :]) if "{" in result.stdout else {}
    job = report.get("jobs", [{}])[0]
    errors = int(job.get("error", 0)) + (result.returncode != 0)
    if errors:
        print(result.stderr.strip()[-2000:], file=sys.stderr)
    return {
        "read": int(job.get("read", {}).get("io_bytes", 0)),
        "written": int(job.get("write", {}).get("io_bytes", 0)),
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument(
        "--phase-mib",
        type=int,
        default=1024,
        help="data each phase covers (1024, the whole disk: a phase lasts a minute or two)",
    )
    args = parser.parse_args()
    if not 0 < args.phase_mib * MiB <= SIZE:
        parser.error(f"--phase-mib must be 1 to {SIZE // MiB}: each job covers a quarter at most")
    become_subreaper()
    stop_cleanly_on_signals()
    folder = Path(tempfile.mkdtemp(prefix="vhdfs-soak-"))
    started = time.monotonic()
    totals = {
        "read": 0,
        "written": 0,
        "errors": 0,
        "phases": 0,
        "findings": 0,
        "remounts_verified": 0,
    }
    peaks: list[int] = []
    try:
        built = build_chain(
            folder / "chain",
            SIZE,
            [
                Layer(writes=[(0, 65536), (600_000, 40_000)]),
                Layer(writes=[(30_000, 60_000), (1_000_000, 80_000)]),
                Layer(block_size=512 << 10),
            ],
        )
        leaf = built.leaf
        deadline = started + args.minutes * 60
        phase = 0
        digest = None
        while time.monotonic() < deadline:
            phase += 1
            mountpoint = folder / f"mnt{phase}"
            mountpoint.mkdir()
            m = Mount([str(leaf)], str(mountpoint), foreground=True)
            sampler = None
            try:
                m.start()
                assert m.pid is not None
                sampler = RssSampler(m.pid)
                sampler.start()
                raw = m.raw(leaf.stem + ".raw")
                survived = digest is None or disk_digest(raw) == digest
                figures = fio(raw, phase, args.phase_mib * MiB)
                digest = disk_digest(raw)
                status = m.stop()
            finally:
                if sampler is not None:
                    sampler.done.set()
                    sampler.join()
                m.cleanup()
            figures["errors"] += (status != 0) + (not survived)
            peaks.append(max(sampler.samples if sampler else [], default=0))
            check = subprocess.run(
                [*vhd_command(), "check", "--json", str(leaf)], capture_output=True, text=True
            )
            findings = len(json.loads(check.stdout)["findings"])
            totals["findings"] += findings + (check.returncode != 0)
            for key in ("read", "written", "errors"):
                totals[key] += figures[key]
            totals["phases"] = phase
            totals["remounts_verified"] += phase > 1 and survived
            print(
                f"phase {phase}: disk as before the remount: {'yes' if survived else 'NO'}; "
                f"fio wrote {figures['written'] / MiB:.0f} MiB and read "
                f"{figures['read'] / MiB:.0f} MiB, each written block verified; "
                f"errors {figures['errors']}, vhd check findings {findings}, "
                f"daemon peak RSS {peaks[-1] / MiB:.0f} MiB, "
                f"{time.monotonic() - started:.0f} s",
                flush=True,
            )
            if figures["errors"] or findings:
                break
        # The last phase's data must survive its unmount too.
        mountpoint = folder / "mnt-final"
        mountpoint.mkdir()
        m = Mount([str(leaf)], str(mountpoint), options=["ro"], foreground=True)
        try:
            m.start()
            survived = digest is None or disk_digest(m.raw(leaf.stem + ".raw")) == digest
            totals["errors"] += (m.stop() != 0) + (not survived)
        finally:
            m.cleanup()
        totals["remounts_verified"] += survived
        print(f"final remount: disk as before: {'yes' if survived else 'NO'}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    growth = (peaks[-1] - peaks[0]) / MiB if peaks else 0.0
    print(
        f"soak: {totals['phases']} phases in {(time.monotonic() - started) / 60:.1f} min over a "
        f"depth-3 chain, {totals['written'] / MiB:.0f} MiB written, {totals['read'] / MiB:.0f} "
        f"MiB read by fio, {totals['remounts_verified']} remounts with the whole disk (1 GiB) "
        f"as before, {totals['errors']} errors, {totals['findings']} findings, "
        f"daemon peak RSS {min(peaks, default=0) / MiB:.0f}-{max(peaks, default=0) / MiB:.0f} "
        f"MiB (last phase vs first: {growth:+.0f} MiB)"
    )
    failed = totals["errors"] or totals["findings"] or growth > 32
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
