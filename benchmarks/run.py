"""vhdfs against qemu-storage-daemon, on the jobs guests run: the one benchmark command.

    .venv/bin/python benchmarks/run.py            # full: 5 rounds, under 20 minutes
    .venv/bin/python benchmarks/run.py --quick    # smoke run: 2 short rounds, about 3 minutes

Run as root (it drops the page cache and reads /proc of the daemons). It builds its images once
under $VHDFS_BENCH_DIR (default /var/tmp/vhdfs-bench): a 1 GiB dynamic VHD of random data made
by qemu-img, a fixed copy of it, and a differencing chain of depth 4 over the same data with
every 64 KiB piece in one of its four layers. Every round then runs each group of jobs on each
of its targets, rotating the order of the targets (a shared machine drifts by tens of percent
between minutes), and the write groups start each round from a fresh copy of an empty image.

Targets: ``vhdfs``; ``qsd``, qemu-storage-daemon's FUSE export of the same file; ``zerofs``,
a pyfuse3 + trio file system answering reads with zeros from memory (the ceiling of the stack),
and ``zerofs+pread``, the same answering with one ``pread`` of the fixed copy (the ceiling
with the host read included); ``vhdfs-d4``, vhdfs on the depth-4 chain.

For each job and target it prints the median figure with min-max over rounds, the daemon's CPU
seconds per GiB moved and its peak RSS, then the ratios; then the mount time and memory of a
2040 GiB sparse image and of one daemon serving 100 images; and last a line
``ratios: job=x.xx ...`` for scripts.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    ROOT,
    VENV_BIN,
    Job,
    Meter,
    Qsd,
    Sample,
    Target,
    Vhdfs,
    ZeroFs,
    cache_dir,
    is_mounted,
    measure,
    need,
    workdir,
)

sys.path.insert(0, str(ROOT))

from vhdfs.disk.virtual import DiskOptions, open_disk

SIZE = 1 << 30
PIECE = 64 << 10
MIB = 1 << 20
#: vhdfs's defaults (-o cache_size=, dirty_limit=): the memory bound is checked against them.
CACHE_SIZE = 64 * MIB
DIRTY_LIMIT = 64 * MIB


@dataclass
class Group:
    """Jobs run together on each of some targets, against one image (or a fresh copy)."""

    title: str
    targets: list[Target]
    jobs: list[Job]
    image: Callable[[Target], Path]
    #: Targets that run only the jobs named here (the ceilings run only 4 KiB reads).
    only: dict[str, set[str]] = field(default_factory=dict)
    #: The other files of the image's chain (warmed with it).
    parents: tuple[Path, ...] = ()


@dataclass
class Results:
    """Every sample, by (group title, target name, job name)."""

    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)

    def add(self, key: tuple[str, str, str], sample: Sample) -> None:
        self.samples.setdefault(key, []).append(sample)

    def median(self, key: tuple[str, str, str]) -> float | None:
        found = self.samples.get(key)
        return statistics.median(s.value for s in found) if found else None


def read_jobs(runtime: int, quick: bool) -> list[Job]:
    timed = (f"--runtime={runtime}", "--time_based", "--ioengine=psync")
    seq_size = "--size=256M" if quick else "--size=1G"
    return [
        Job("seq 1M read, buffered cold", ("--rw=read", "--bs=1M", seq_size), "MiB/s", cold=True),
        Job(
            "seq 1M read, O_DIRECT",
            ("--rw=read", "--bs=1M", "--direct=1", *timed),
            "MiB/s",
            warm=True,
        ),
        Job(
            "seq 1M re-read, page cache kept",
            ("--rw=read", "--bs=1M", seq_size, "--invalidate=0", "--loops=2"),
            "MiB/s",
            warm=True,
            primed=True,
        ),
        Job("rand 4K read, buffered cold", ("--rw=randread", "--bs=4k", *timed), "IOPS", cold=True),
        Job(
            "rand 4K read, O_DIRECT",
            ("--rw=randread", "--bs=4k", "--direct=1", *timed),
            "IOPS",
            warm=True,
        ),
        Job(
            "rand 4K read, O_DIRECT, 4 jobs",
            ("--rw=randread", "--bs=4k", "--direct=1", "--numjobs=4", *timed),
            "IOPS",
            warm=True,
        ),
        Job(
            "rand 4K read, O_DIRECT, iodepth 16",
            (
                "--rw=randread",
                "--bs=4k",
                "--direct=1",
                f"--runtime={runtime}",
                "--time_based",
                "--ioengine=libaio",
                "--iodepth=16",
            ),
            "IOPS",
            warm=True,
        ),
    ]


def write_jobs(runtime: int, quick: bool) -> list[Job]:
    return [
        Job(
            "seq 1M write + fsync",
            (
                "--rw=write",
                "--bs=1M",
                "--size=128M" if quick else "--size=512M",
                "--ioengine=psync",
                "--end_fsync=1",
            ),
            "MiB/s",
            direction="write",
        ),
        Job(
            "rand 4K write + fsync",
            (
                "--rw=randwrite",
                "--bs=4k",
                "--ioengine=psync",
                "--end_fsync=1",
                f"--runtime={runtime}",
                "--time_based",
                "--randrepeat=0",
            ),
            "IOPS",
            direction="write",
        ),
    ]


# -- images --------------------------------------------------------------------------------


def build_images(base: Path) -> dict[str, Path]:
    """The read image, its fixed copy, the depth-4 chain and the empty write templates."""
    images = {
        "dynamic": base / "read-1g.vhd",
        "fixed": base / "read-1g-fixed.vhd",
        "chain": base / "chain" / "layer3.vhd",
        "empty-fixed": base / "empty-fixed.vhd",
        "empty-dynamic": base / "empty-dynamic.vhd",
    }
    raw = base / "random.raw"
    if not images["dynamic"].exists() or not images["fixed"].exists():
        print("building the 1 GiB images of random data ...", flush=True)
        with open(raw, "wb") as f:
            for _ in range(SIZE // MIB):
                f.write(os.urandom(MIB))
        for kind in ("dynamic", "fixed"):
            images[kind].unlink(missing_ok=True)
            qemu_img(
                "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={kind}", raw, images[kind]
            )
    if not images["chain"].exists():
        print("building the depth-4 chain ...", flush=True)
        build_chain(images["dynamic"], images["chain"].parent)
    for kind in ("fixed", "dynamic"):
        if not images[f"empty-{kind}"].exists():
            qemu_img(
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                f"subformat={kind}",
                images[f"empty-{kind}"],
                str(SIZE),
            )
    raw.unlink(missing_ok=True)
    return images


def qemu_img(*argv: object) -> None:
    subprocess.run(["qemu-img", *map(str, argv)], check=True)


def build_chain(source: Path, folder: Path) -> None:
    """Four layers over the data of ``source``: each 64 KiB piece goes to one random layer."""
    import trio

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(4)
    owner = [rng.randrange(4) for _ in range(SIZE // PIECE)]
    layers = [folder / f"layer{depth}.vhd" for depth in range(4)]
    vhd = str(VENV_BIN / "vhd")
    subprocess.run([vhd, "create", "-s", str(SIZE), str(layers[0])], check=True)

    async def fill() -> None:
        data = open_disk(str(source), DiskOptions(read_only=True))
        try:
            for depth, layer in enumerate(layers):
                if depth:
                    subprocess.run(
                        [vhd, "create", "-p", layers[depth - 1].name, str(layer)],
                        check=True,
                        cwd=folder,
                    )
                disk = open_disk(str(layer), DiskOptions())
                try:
                    for piece, depth_of in enumerate(owner):
                        if depth_of == depth:
                            chunk = bytes(await data.read(piece * PIECE, PIECE))
                            await disk.write(piece * PIECE, chunk)
                        if piece % 256 == 255:  # no flusher task runs here: write out now
                            await disk.flush(durable=False)
                finally:
                    await disk.aclose()
        finally:
            await data.aclose()

    trio.run(fill)


# -- running -------------------------------------------------------------------------------


def run_rounds(groups: list[Group], rounds: int) -> Results:
    results = Results()
    for round_no in range(rounds):
        for group in groups:
            shift = round_no % len(group.targets)
            for target in group.targets[shift:] + group.targets[:shift]:
                image = group.image(target)
                path = target.start(image)
                try:
                    for job in group.jobs:
                        if target.name in group.only and job.name not in group.only[target.name]:
                            continue
                        sample = measure(target, path, image, job, group.parents)
                        results.add((group.title, target.name, job.name), sample)
                        print(
                            f"  round {round_no + 1}/{rounds}  {group.title:8} "
                            f"{target.name:13} {job.name:36} {sample.value:9.0f} {job.metric}",
                            flush=True,
                        )
                finally:
                    target.stop()
    return results


def print_group(results: Results, group: Group, compare: list[tuple[str, str]]) -> None:
    """The table of one group: per job, a row per target and then its ratios."""
    print(f"\n{group.title}: median [min-max] over rounds, daemon CPU s/GiB, daemon peak RSS")
    for job in group.jobs:
        print(f"{job.name} ({job.metric})")
        for target in group.targets:
            found = results.samples.get((group.title, target.name, job.name))
            if not found:
                continue
            values = [s.value for s in found]
            cpu = statistics.median(s.cpu_per_gib for s in found)
            peak = max(s.peak_rss for s in found) / MIB
            print(
                f"    {target.name:13} {statistics.median(values):9.0f} "
                f"[{min(values):.0f}-{max(values):.0f}]".ljust(48)
                + f"{cpu:8.2f} s/GiB {peak:7.0f} MiB"
            )
        for a, b in compare:
            ratio = ratio_of(results, group.title, job.name, a, b)
            if ratio is not None:
                print(f"    {a + '/' + b:28} {ratio:.2f}")


def ratio_of(results: Results, title: str, job: str, a: str, b: str) -> float | None:
    """Median of target ``a`` over median of ``b``; ``b`` may be ``group:target``."""
    b_title, _, b_name = b.rpartition(":")
    va = results.median((title, a, job))
    vb = results.median((b_title or title, b_name, job))
    if va is None or vb is None or vb == 0:
        return None
    return va / vb


def slug(job: Job) -> str:
    words = job.name.replace(",", "").replace("+", "").replace("O_DIRECT", "direct").split()
    return "_".join(w.lower() for w in words if w not in {"read", "write"})


# -- mounting many and mounting big ---------------------------------------------------------


def mount_and_measure(images: list[Path], folder: Path) -> tuple[float, subprocess.Popen[bytes]]:
    mnt = folder / "scale-mnt"
    mnt.mkdir(exist_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        [str(VENV_BIN / "vhdfs"), "-f", "-o", "ro", *map(str, images), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    while not is_mounted(str(mnt)):
        if process.poll() is not None:
            raise RuntimeError(process.communicate()[1].decode())
        time.sleep(0.002)
    return time.perf_counter() - start, process


def direct_reads(path: Path, span: int, count: int, seed: int) -> None:
    """``count`` random 4 KiB O_DIRECT reads in the first ``span`` bytes of ``path``."""
    rng = random.Random(seed)
    buffer = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(count):
            os.preadv(fd, [buffer], rng.randrange(span // 4096) * 4096)
    finally:
        os.close(fd)


def stop(process: subprocess.Popen[bytes], mnt: Path) -> None:
    process.terminate()
    process.communicate(timeout=60)
    if is_mounted(str(mnt)):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def scale_checks(base: Path, folder: Path, quick: bool) -> dict[str, float]:
    """Mount time and RSS of a 2040 GiB sparse image; RSS of one daemon serving 100 images."""
    figures: dict[str, float] = {}
    big = folder / "big.vhd"
    subprocess.run([str(VENV_BIN / "vhd"), "create", "-s", "2040G", str(big)], check=True)
    seconds, process = mount_and_measure([big], folder)
    try:
        meter = Meter(process.pid)
        direct_reads(folder / "scale-mnt" / "big.raw", 2040 << 30, 2000, 1)
        figures["big_mount_s"] = seconds
        figures["big_rss_mib"] = meter.peak_rss() / MIB
    finally:
        stop(process, folder / "scale-mnt")
    print(
        f"\n2040 GiB sparse image: mounted in {seconds:.3f} s, "
        f"peak RSS {figures['big_rss_mib']:.0f} MiB after 2000 random reads "
        f"(goal: < 0.5 s and < 64 MiB)"
    )

    many = []
    template = folder / "small.vhd"
    raw = folder / "small.raw"
    raw.write_bytes(os.urandom(16 * MIB))
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, template)
    for number in range(100):
        copy = folder / f"disk{number:03}.vhd"
        shutil.copyfile(template, copy)
        many.append(copy)
    seconds, process = mount_and_measure(many, folder)
    try:
        meter = Meter(process.pid)
        reads = 300 if quick else 1000
        for _ in range(2):  # a second pass makes the cache keep what it read
            for number, image in enumerate(many):
                direct_reads(folder / "scale-mnt" / (image.stem + ".raw"), 16 * MIB, reads, number)
        figures["many_rss_mib"] = meter.peak_rss() / MIB
    finally:
        stop(process, folder / "scale-mnt")
    print(
        f"100 images in one daemon: mounted in {seconds:.2f} s, peak RSS "
        f"{figures['many_rss_mib']:.0f} MiB after {2 * reads} random reads of each "
        f"(goal: < cache_size + 128 MiB = {(CACHE_SIZE >> 20) + 128} MiB)"
    )
    return figures


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 short rounds (about 3 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, --quick 2)")
    parser.add_argument("--runtime", type=int, help="seconds per timed job (default 4, quick 1)")
    parser.add_argument(
        "--only",
        choices=["reads", "writes", "chain"],
        action="append",
        help="run only these groups (repeatable; no scale checks)",
    )
    parser.add_argument(
        "-o", dest="options", action="append", default=[], help="extra vhdfs -o option (repeatable)"
    )
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    runtime = args.runtime or (1 if args.quick else 4)
    if os.geteuid() != 0:
        sys.exit("benchmark: run as root (it drops the page cache)")
    need("fio", "fio")
    need("qemu-storage-daemon", "qemu-system-common")
    need("qemu-img", "qemu-utils")

    images = build_images(cache_dir())
    folder = workdir()
    started = time.monotonic()
    try:
        reads = read_jobs(runtime, args.quick)
        writes = write_jobs(runtime, args.quick)
        small = {job.name for job in reads if "4K" in job.name}
        vhdfs = Vhdfs(folder, ["ro", *args.options])

        def fresh(template: Path) -> Callable[[Target], Path]:
            def copy(target: Target) -> Path:
                image = folder / f"{target.name}-{template.name}"
                subprocess.run(["cp", "--sparse=always", template, image], check=True)
                os.sync()  # the copy's own writeback must not compete with the run
                return image

            return copy

        def fresh_chain(target: Target) -> Path:
            leaf = images["chain"]
            copy = leaf.parent / "bench-leaf.vhd"
            shutil.copyfile(leaf, copy)
            os.sync()
            return copy

        read_group = Group(
            "dynamic",
            [vhdfs, Qsd(folder, writable=False), ZeroFs(folder, SIZE), ZeroFs(folder, SIZE, 512)],
            reads,
            lambda t: images["fixed"] if t.name == "zerofs+pread" else images["dynamic"],
            {"zerofs": small, "zerofs+pread": small},
        )
        groups = [read_group]
        for kind in ("fixed", "dynamic"):
            groups.append(
                Group(
                    f"{kind} w",
                    [Vhdfs(folder, args.options), Qsd(folder, writable=True)],
                    writes,
                    fresh(images[f"empty-{kind}"]),
                )
            )
        groups.append(
            Group(
                "chain d4",
                [Vhdfs(folder, args.options, name="vhdfs-d4")],
                reads + writes,
                fresh_chain,
                parents=tuple(images["chain"].parent / f"layer{n}.vhd" for n in range(3)),
            )
        )
        if args.only:
            wanted = {"reads": groups[:1], "writes": groups[1:3], "chain": groups[3:]}
            groups = [g for name in args.only for g in wanted[name]]
        results = run_rounds(groups, rounds)
        if args.only:
            for group in groups:
                print_group(results, group, [("vhdfs", "qsd"), ("vhdfs", "zerofs")])
            return

        summary: list[str] = []
        read_compare = [("vhdfs", "qsd"), ("vhdfs", "zerofs"), ("vhdfs", "zerofs+pread")]
        print_group(results, groups[0], read_compare)
        for group in groups[1:3]:
            print_group(results, group, [("vhdfs", "qsd")])
        print_group(
            results, groups[3], [("vhdfs-d4", "dynamic:vhdfs"), ("vhdfs-d4", "dynamic w:vhdfs")]
        )
        for job in reads:
            for other in ("qsd", "zerofs"):
                ratio = ratio_of(results, "dynamic", job.name, "vhdfs", other)
                if ratio is not None:
                    summary.append(f"{slug(job)}_vs_{other}={ratio:.2f}")
            ratio = ratio_of(results, "chain d4", job.name, "vhdfs-d4", "dynamic:vhdfs")
            if ratio is not None:
                summary.append(f"{slug(job)}_d4_vs_d1={ratio:.2f}")
        for kind in ("fixed", "dynamic"):
            for job in writes:
                ratio = ratio_of(results, f"{kind} w", job.name, "vhdfs", "qsd")
                if ratio is not None:
                    summary.append(f"{kind}_{slug(job)}_vs_qsd={ratio:.2f}")
        for job in writes:
            ratio = ratio_of(results, "chain d4", job.name, "vhdfs-d4", "dynamic w:vhdfs")
            if ratio is not None:
                summary.append(f"{slug(job)}_d4_vs_d1={ratio:.2f}")

        bound = CACHE_SIZE + DIRTY_LIMIT + 64 * MIB
        peaks = [
            max(s.peak_rss for s in found)
            for (title, name, _), found in results.samples.items()
            if name.startswith("vhdfs")
        ]
        worst = max(peaks) / MIB
        print(
            f"\nvhdfs peak RSS over every job: {worst:.0f} MiB "
            f"(bound: cache_size + dirty_limit + 64 MiB = {bound // MIB} MiB)"
        )
        scale = scale_checks(cache_dir(), folder, args.quick)
        summary += [f"{key}={value:.2f}" for key, value in scale.items()]
        summary.append(f"peak_rss_mib={worst:.0f}")
        print(f"\nrounds {rounds}, runtime {runtime} s, took {time.monotonic() - started:.0f} s")
        print("ratios: " + " ".join(summary))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
