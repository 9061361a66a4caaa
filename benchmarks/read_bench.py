"""Read throughput: vhdfs vs qemu-storage-daemon's FUSE export vs the zerofs ceiling.

One 1 GiB dynamic VHD made by `qemu-img convert` from random data is served by each target in
turn; fio reads it sequentially in 1 MiB requests and randomly in 4 KiB requests, buffered
with every page cache dropped first (the cold case: host disk included), and with O_DIRECT
while the image file sits in the host page cache (the daemons' own cost, without the disk).
Run as root (dropping caches needs it):

    .venv/bin/python benchmarks/read_bench.py [--rounds 3] [--runtime 5] [-o io=thread ...]

Prints every measurement, then medians with min-max and the ratios vhdfs/qsd and vhdfs/zerofs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from harness import Job, Qsd, Vhdfs, ZeroFs, parse_args, print_table, run_rounds, workdir

SIZE = 1 << 30


def make_image(folder: Path) -> Path:
    cached = Path(os.environ.get("VHDFS_BENCH_DIR", "/var/tmp/vhdfs-bench")) / "read-1g.vhd"
    if not cached.exists():
        raw = folder / "random.raw"
        with open(raw, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic",
                raw,
                cached,
            ],
            check=True,
        )
        raw.unlink()
    return cached


def jobs(runtime: int) -> list[Job]:
    timed = (f"--runtime={runtime}", "--time_based", "--ioengine=psync")
    return [
        Job("seq 1M buffered", ("--rw=read", "--bs=1M", "--ioengine=psync"), "MiB/s", cold=True),
        Job("seq 1M O_DIRECT", ("--rw=read", "--bs=1M", "--direct=1", *timed), "MiB/s", warm=True),
        Job("rand 4K buffered", ("--rw=randread", "--bs=4k", *timed), "IOPS", cold=True),
        Job(
            "rand 4K O_DIRECT",
            ("--rw=randread", "--bs=4k", "--direct=1", *timed),
            "IOPS",
            warm=True,
        ),
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "seconds per timed fio job")
    folder = workdir()
    try:
        image = make_image(folder)
        # Each daemon gets its own copy so no file is shared (and locked) between them.
        qsd_image = folder / "qsd.vhd"
        shutil.copyfile(image, qsd_image)
        targets = [
            Vhdfs(folder, ["ro", *args.options]),
            Qsd(folder, writable=False),
            ZeroFs(folder, SIZE),
        ]
        images = {"vhdfs": image, "qsd": qsd_image, "zerofs": image}
        job_list = jobs(args.runtime)
        results = run_rounds(images, targets, job_list, args.rounds)
        print_table(results, targets, job_list, base="vhdfs")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
