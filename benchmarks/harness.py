"""The parts of the benchmark: FUSE daemons started and stopped by PID, fio runs, and meters.

Every target is a foreground process this module starts and stops itself (by PID): vhdfs,
qemu-storage-daemon's FUSE export, and zerofs (the ceiling of pyfuse3 + trio + kernel FUSE).
While a job runs, the daemon's CPU time (``/proc/PID/stat``, all threads) and its peak resident
memory (``VmHWM`` in ``/proc/PID/status``, reset before each job through ``clear_refs``) are
recorded beside fio's figure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent
_TICKS = os.sysconf("SC_CLK_TCK")


def is_mounted(path: str) -> bool:
    """True when something is mounted at ``path``."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def drop_caches() -> None:
    """Empty the host page cache (the image files and every FUSE file's cached pages)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm_up(path: Path | str) -> None:
    """Read ``path`` once so the host page cache holds it."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def need(tool: str, package: str) -> None:
    """Exit with the package to install when ``tool`` is missing."""
    if shutil.which(tool) is None:
        sys.exit(f"benchmark: {tool} not found; apt-get install {package}")


def workdir() -> Path:
    """A fresh folder under ``$VHDFS_BENCH_DIR`` (default /var/tmp/vhdfs-bench)."""
    return Path(tempfile.mkdtemp(dir=cache_dir()))


def cache_dir() -> Path:
    """Where built images are kept between runs."""
    base = Path(os.environ.get("VHDFS_BENCH_DIR", "/var/tmp/vhdfs-bench"))
    base.mkdir(parents=True, exist_ok=True)
    return base


class Meter:
    """CPU seconds and peak RSS of one process, over an interval."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu = 0.0

    def start(self) -> None:
        """Reset the peak RSS and note the CPU time so far."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM to the current RSS
        self._cpu = self.cpu_seconds()

    def cpu_seconds(self) -> float:
        """User plus system time of every thread of the process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def stop(self) -> tuple[float, int]:
        """CPU seconds since ``start`` and the peak RSS in bytes since then."""
        cpu = self.cpu_seconds() - self._cpu
        return cpu, self.peak_rss()

    def peak_rss(self) -> int:
        """``VmHWM`` in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmHWM for {self.pid}")


class Target:
    """A FUSE daemon exposing one image as a raw file."""

    name = "target"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.raw = ""

    def argv(self, image: Path) -> tuple[list[str], str]:
        """The command line serving ``image``, and the path of the raw file it shows."""
        raise NotImplementedError

    def mountpoint(self) -> str:
        """Where the daemon mounts (the raw file itself unless overridden)."""
        return self.raw

    def start(self, image: Path) -> str:
        """Start serving ``image``; return the raw file's path once it is mounted."""
        argv, self.raw = self.argv(image)
        mountpoint = self.mountpoint()
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not is_mounted(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                err = self.process.communicate(timeout=10)[1].decode()
                raise RuntimeError(f"{self.name} did not mount: {err}")
            time.sleep(0.005)
        return self.raw

    def meter(self) -> Meter:
        """A meter of the daemon process."""
        assert self.process is not None
        return Meter(self.process.pid)

    def stop(self) -> None:
        """Stop the daemon by its PID (SIGTERM, then SIGKILL after a minute)."""
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
    """vhdfs, mounting the image on a folder."""

    def __init__(self, workdir: Path, options: list[str], name: str = "vhdfs") -> None:
        super().__init__(workdir)
        self.options = options
        self.name = name

    def argv(self, image: Path) -> tuple[list[str], str]:
        mnt = self.workdir / f"{self.name}-mnt"
        mnt.mkdir(exist_ok=True)
        argv = [str(VENV_BIN / "vhdfs"), "-f"]
        for option in self.options:
            argv += ["-o", option]
        return [*argv, str(image), str(mnt)], str(mnt / (image.stem + ".raw"))

    def mountpoint(self) -> str:
        return str(self.workdir / f"{self.name}-mnt")


class Qsd(Target):
    """qemu-storage-daemon's FUSE export of the image (its vpc driver, host page cache on)."""

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
    """The stack's ceiling: zeros from memory, or (``pread``) the image's bytes at ``offset``."""

    def __init__(self, workdir: Path, size: int, pread_offset: int | None = None) -> None:
        super().__init__(workdir)
        self.size = size
        self.pread_offset = pread_offset
        self.name = "zerofs" if pread_offset is None else "zerofs+pread"

    def argv(self, image: Path) -> tuple[list[str], str]:
        raw = self.workdir / f"{self.name}.raw"
        raw.touch()
        argv = [sys.executable, str(BENCH_DIR / "zerofs.py"), str(self.size), str(raw)]
        if self.pread_offset is not None:
            argv += ["--pread", str(image), str(self.pread_offset)]
        return argv, str(raw)


@dataclass(frozen=True)
class Job:
    """One fio job: a name, its fio arguments, and the figure reported."""

    name: str
    args: tuple[str, ...]
    metric: str  # "MiB/s" or "IOPS"
    direction: str = "read"
    cold: bool = False  # drop the page cache first
    warm: bool = False  # read the image into the host page cache first
    primed: bool = False  # read the raw file once first (its FUSE page cache stays)


@dataclass(frozen=True)
class Sample:
    """What one job measured on one target."""

    value: float
    cpu_per_gib: float
    peak_rss: int


def run_fio(path: str, job: Job) -> tuple[float, int]:
    """Run ``job`` on ``path``; return its figure and the bytes it moved."""
    result = subprocess.run(
        [
            "fio",
            "--name=bench",
            f"--filename={path}",
            "--output-format=json",
            "--group_reporting",
            *job.args,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # fio prints notes before the JSON when it runs jobs; keep only the JSON document.
    stats = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0][job.direction]
    value = stats["bw_bytes"] / (1 << 20) if job.metric == "MiB/s" else stats["iops"]
    return value, stats["io_bytes"]


def measure(
    target: Target, path: str, image: Path, job: Job, parents: tuple[Path, ...] = ()
) -> Sample:
    """Run ``job`` against the mounted ``target``, with its meters.

    ``parents`` are the other files of the image's chain, warmed with it.
    """
    if job.cold:
        drop_caches()
    if job.warm:
        for file in (image, *parents):
            warm_up(file)
    if job.primed:
        warm_up(path)
    meter = target.meter()
    meter.start()
    value, moved = run_fio(path, job)
    cpu, peak = meter.stop()
    return Sample(value, cpu / max(moved / (1 << 30), 1e-9), peak)
