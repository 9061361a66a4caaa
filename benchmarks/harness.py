"""Side-by-side fio runs against vhdfs, qemu-storage-daemon's FUSE export, and the zerofs ceiling.

Every target is started as a foreground process this script owns (by PID) and stopped the
same way. Rounds are interleaved (target order rotates each round) because a machine shared
with other work drifts by tens of percent between runs; results are medians with min-max over
rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"benchmark: {tool} not found; apt-get install {package}")


class Target:
    """A FUSE daemon exposing one image as a raw file."""

    name = "target"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.raw = ""

    def argv(self, image: Path) -> tuple[list[str], str]:
        raise NotImplementedError

    def start(self, image: Path) -> str:
        argv, self.raw = self.argv(image)
        mountpoint = self.mountpoint()
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not is_mounted(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                err = self.process.communicate(timeout=10)[1].decode()
                raise RuntimeError(f"{self.name} did not mount: {err}")
            time.sleep(0.02)
        return self.raw

    def mountpoint(self) -> str:
        return self.raw

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        if is_mounted(self.mountpoint()):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint()], check=False)
        self.process = None


class Vhdfs(Target):
    name = "vhdfs"

    def __init__(self, workdir: Path, options: list[str]) -> None:
        super().__init__(workdir)
        self.options = options

    def argv(self, image: Path) -> tuple[list[str], str]:
        mnt = self.workdir / "vhdfs-mnt"
        mnt.mkdir(exist_ok=True)
        argv = [str(VENV_BIN / "vhdfs"), "-f"]
        for option in self.options:
            argv += ["-o", option]
        return [*argv, str(image), str(mnt)], str(mnt / (image.stem + ".raw"))

    def mountpoint(self) -> str:
        return str(self.workdir / "vhdfs-mnt")


class Qsd(Target):
    name = "qsd"

    def __init__(self, workdir: Path, writable: bool) -> None:
        super().__init__(workdir)
        self.writable = writable

    def argv(self, image: Path) -> tuple[list[str], str]:
        raw = self.workdir / "qsd.raw"
        raw.touch()
        ro = "off" if self.writable else "on"
        return [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},read-only={ro},cache.direct=off",
            "--blockdev",
            f"driver=vpc,node-name=disk0,file=file0,read-only={ro}",
            "--export",
            f"type=fuse,id=exp0,node-name=disk0,mountpoint={raw},"
            f"writable={'on' if self.writable else 'off'}",
        ], str(raw)


class ZeroFs(Target):
    name = "zerofs"

    def __init__(self, workdir: Path, size: int) -> None:
        super().__init__(workdir)
        self.size = size

    def argv(self, image: Path) -> tuple[list[str], str]:
        raw = self.workdir / "zerofs.raw"
        raw.touch()
        return [sys.executable, str(BENCH_DIR / "zerofs.py"), str(self.size), str(raw)], str(raw)


@dataclass(frozen=True)
class Job:
    """One fio job: a name, its fio arguments, and the figure reported."""

    name: str
    args: tuple[str, ...]
    metric: str  # "MiB/s" or "IOPS"
    direction: str = "read"
    cold: bool = False  # drop the page cache first
    warm: bool = False  # read the image into the host page cache first


def run_fio(path: str, job: Job) -> float:
    result = subprocess.run(
        ["fio", "--name=bench", f"--filename={path}", "--output-format=json", *job.args],
        capture_output=True,
        text=True,
        check=True,
    )
    # fio prints notes before the JSON when it runs jobs; keep only the JSON document.
    stats = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0][job.direction]
    return stats["bw_bytes"] / (1 << 20) if job.metric == "MiB/s" else stats["iops"]


@dataclass
class Results:
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, target: str, job: str, value: float) -> None:
        self.values.setdefault((target, job), []).append(value)

    def cell(self, target: str, job: str) -> str:
        values = self.values.get((target, job))
        if not values:
            return "-"
        return f"{statistics.median(values):9.0f} [{min(values):.0f}-{max(values):.0f}]"

    def ratio(self, a: str, b: str, job: str) -> str:
        va, vb = self.values.get((a, job)), self.values.get((b, job))
        if not va or not vb:
            return "-"
        return f"{statistics.median(va) / statistics.median(vb):.2f}"


def warm_up(image: Path) -> None:
    """Read ``image`` once so the host page cache holds it."""
    with open(image, "rb") as f:
        while f.read(8 << 20):
            pass


def run_rounds(
    image_for: dict[str, Path],
    targets: list[Target],
    jobs: list[Job],
    rounds: int,
    prepare: Callable[[Target], Path] | None = None,
) -> Results:
    """Run every job on every target, ``rounds`` times, rotating the target order.

    ``prepare``, when given, returns a fresh image for a target before each of its rounds
    (write benchmarks start every round from the same unwritten image).
    """
    results = Results()
    for round_no in range(rounds):
        order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
        for target in order:
            image = prepare(target) if prepare else image_for[target.name]
            path = target.start(image)
            try:
                for job in jobs:
                    if job.cold:
                        drop_caches()
                    if job.warm:
                        warm_up(image)
                    value = run_fio(path, job)
                    results.add(target.name, job.name, value)
                    print(
                        f"  round {round_no + 1}/{rounds} {target.name:7} {job.name:24} "
                        f"{value:10.1f} {job.metric}",
                        flush=True,
                    )
            finally:
                target.stop()
    return results


def print_table(results: Results, targets: list[Target], jobs: list[Job], base: str) -> None:
    names = [t.name for t in targets]
    others = [n for n in names if n != base]
    header = f"{'job':28}" + "".join(f"{n:>22}" for n in names)
    header += "".join(f"{base + '/' + o:>14}" for o in others)
    print()
    print("median [min-max] over rounds")
    print(header)
    for job in jobs:
        row = f"{job.name + ' ' + job.metric:28}"
        row += "".join(f"{results.cell(n, job.name):>22}" for n in names)
        row += "".join(f"{results.ratio(base, o, job.name):>14}" for o in others)
        print(row)


def parse_args(description: str, runtime_help: str) -> argparse.Namespace:
    """The options every benchmark takes; exits early if a tool it needs is missing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help=runtime_help)
    parser.add_argument("-o", dest="options", action="append", default=[], help="vhdfs -o option")
    args = parser.parse_args()
    need("fio", "fio")
    need("qemu-storage-daemon", "qemu-system-common")
    return args


def workdir() -> Path:
    base = Path(os.environ.get("VHDFS_BENCH_DIR", "/var/tmp/vhdfs-bench"))
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base))
