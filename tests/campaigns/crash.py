"""The crash campaign: the daemon killed with SIGKILL at random instants, many times over.

    .venv/bin/python -m tests.campaigns.crash [--kills 1000] [--seed 0] [--keep DIR]

Each kill runs ``tests.support.crashes.kill_under_load`` on a fresh image, dynamic and
differencing in turn: a journaled writer with fsyncs in one half of the disk, fio's mixed
read/write/fsync load in the other, SIGKILL at a random instant, then the image checked with
``vhd check``, vhdfs, qemu-img (dynamic) and vhdimount, every sector as the fsync-acknowledged
writes left it (or as a later write made it), and the image written again. A failing kill's
folder is kept under ``--keep``. Prints a line every 50 kills and a summary; exits 1 if any
kill failed. Needs root, FUSE, fio, qemu-img and vhdimount, like the test suite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.campaigns import stop_cleanly_on_signals
from tests.support.crashes import kill_under_load
from tests.support.mounting import become_subreaper, mount_factory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="first seed (one per kill)")
    parser.add_argument("--keep", type=Path, default=Path("/var/tmp/vhdfs-crash-failures"))
    args = parser.parse_args()
    become_subreaper()
    stop_cleanly_on_signals()
    started = time.monotonic()
    failures: list[int] = []
    acknowledged = 0
    for number in range(args.kills):
        seed = args.seed + number
        kind = ("dynamic", "differencing")[seed % 2]
        folder = Path(tempfile.mkdtemp(prefix=f"vhdfs-crash-{seed}-"))
        try:
            with mount_factory(folder) as mount:
                acknowledged += kill_under_load(folder, kind, seed, mount, fio=True)
            shutil.rmtree(folder)
        except Exception:
            failures.append(seed)
            args.keep.mkdir(parents=True, exist_ok=True)
            kept = args.keep / folder.name
            shutil.move(str(folder), kept)
            print(f"kill {number + 1} (seed {seed}, {kind}) FAILED; kept in {kept}", flush=True)
            traceback.print_exc()
        if (number + 1) % 50 == 0:
            print(
                f"{number + 1} kills, {len(failures)} failed, {acknowledged} fsync-acknowledged "
                f"writes verified, {time.monotonic() - started:.0f} s",
                flush=True,
            )
    print(
        f"crash campaign: {args.kills} kills (seeds {args.seed}-{args.seed + args.kills - 1}), "
        f"{len(failures)} failed {failures[:20]}, {acknowledged} fsync-acknowledged writes "
        f"verified, {time.monotonic() - started:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
