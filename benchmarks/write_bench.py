"""Write throughput: vhdfs vs qemu-storage-daemon's FUSE export (writable=on).

Each round starts every target from its own fresh copy of the same unwritten image (1 GiB,
fixed and dynamic, made by qemu-img), so dynamic runs include block allocation. fio writes
sequentially in 1 MiB requests and randomly in 4 KiB requests, each job ending in fsync.
Run as root:

    .venv/bin/python benchmarks/write_bench.py [--rounds 3] [--runtime 5] [-o writeback=1 ...]

Prints every measurement, then medians with min-max and the ratio vhdfs/qsd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from harness import Job, Qsd, Target, Vhdfs, parse_args, print_table, run_rounds, workdir

SIZE = 1 << 30


def jobs(runtime: int) -> list[Job]:
    return [
        Job(
            "seq 1M write+fsync",
            ("--rw=write", "--bs=1M", "--size=512M", "--ioengine=psync", "--end_fsync=1"),
            "MiB/s",
            direction="write",
        ),
        Job(
            "rand 4K write+fsync",
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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "seconds of random writes")
    folder = workdir()
    try:
        for subformat in ("fixed", "dynamic"):
            template = folder / f"{subformat}.template.vhd"
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "vpc",
                    "-o",
                    f"subformat={subformat}",
                    str(template),
                    str(SIZE),
                ],
                check=True,
            )

            def fresh(target: Target, template: Path = template) -> Path:
                image = folder / f"{target.name}.vhd"
                # Sparse copy, then sync: the copy's own writeback must not compete with the run.
                subprocess.run(["cp", "--sparse=always", str(template), str(image)], check=True)
                os.sync()
                return image

            targets: list[Target] = [
                Vhdfs(folder, args.options),
                Qsd(folder, writable=True),
            ]
            job_list = jobs(args.runtime)
            print(f"\n{subformat} image")
            results = run_rounds({}, targets, job_list, args.rounds, prepare=fresh)
            print_table(results, targets, job_list, base="vhdfs")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
