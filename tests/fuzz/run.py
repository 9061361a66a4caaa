"""Run the fuzzer: mutated images through open, read, report, check and write.

    .venv/bin/python -m tests.fuzz.run --inputs 1000000        # the long run
    .venv/bin/python -m tests.fuzz.run --inputs 2000 --seed 7  # a quick one

Each input is one seed image (or chain) with 1-3 field-aware mutations (``mutate``), written to
a fresh folder on tmpfs and exercised (``target``) in a worker process that runs under an
address-space limit (so memory sized by a lying field fails as MemoryError) and an alarm (so a
hang fails as a timeout). Inputs are numbered and derived from ``--seed``, so any input can be
made again. Failures are grouped by exception type and place; the first input of each group is
saved, compressed, under ``--save`` (default ``tests/fuzz/found``) to become a regression case
in ``tests/fuzz/regressions``. The last line is ``fuzz: N inputs ... failures=F``; the exit
status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import lzma
import multiprocessing
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.fuzz.mutate import Files, mutate
from tests.fuzz.seeds import Seed, all_seeds
from tests.fuzz.target import exercise, materialize

_seeds: list[Seed] = []
_timeout = 10


class Timeout(Exception):
    """The input took longer than the alarm allows (a hang)."""


def _alarm(signum: int, frame: object) -> None:
    raise Timeout(f"no outcome within {_timeout} s")


def _init(seeds: list[Seed], memory: int, timeout: int) -> None:
    global _seeds, _timeout
    _seeds, _timeout = seeds, timeout
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.signal(signal.SIGALRM, _alarm)


def make_input(seeds: list[Seed], seed: int, number: int) -> Files:
    """Input ``number`` of the run seeded ``seed``: a seed image and its mutations."""
    rng = random.Random(seed * 1_000_003 + number)
    base = seeds[rng.randrange(len(seeds))]
    files = Files(dict(base.files), base.leaf, [base.name])
    for _ in range(rng.randint(1, 3)):
        mutate(rng.randint, files)
    return files


def _place(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/vhdfs/" in f.filename] or frames
    last = ours[-1] if ours else None
    where = f"{os.path.basename(last.filename)}:{last.lineno}" if last else "?"
    return f"{type(exc).__name__} at {where}"


def run_one(args: tuple[int, int]) -> tuple[int, str, str | None, list[str]]:
    """Exercise input ``number``; return its outcome, or the failure and its signature."""
    seed, number = args
    folder = Path(tempfile.mkdtemp(prefix="vhdfs-fuzz-", dir=_scratch()))
    files = Files({}, "", [f"input {number} could not be made"])
    try:
        files = make_input(_seeds, seed, number)
        leaf = materialize(folder, files)
        signal.alarm(_timeout)
        try:
            outcome = exercise(folder, leaf, number)
        finally:
            signal.alarm(0)
        return number, outcome, None, files.done
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        detail = "".join(traceback.format_exception(exc)[-6:])
        return number, "failed", f"{_place(exc)}\n{detail}", files.done
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _scratch() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def save_input(target: Path, files: Files, description: dict[str, object]) -> None:
    """Keep a failing input: its files (xz) and what was done to them."""
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.data.items():
        path = target / (name + ".xz")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(bytes(data)))
    description = {**description, "leaf": files.leaf, "special": files.special}
    (target / "input.json").write_text(json.dumps(description, indent=1) + "\n")


def load_input(source: Path) -> tuple[Files, int]:
    """A saved input (see ``save_input``) and the number its run gave it."""
    description = json.loads((source / "input.json").read_text())
    data = {
        str(path.relative_to(source))[: -len(".xz")]: lzma.decompress(path.read_bytes())
        for path in source.rglob("*.xz")
    }
    files = Files(data, description["leaf"], description["mutations"], description["special"])
    return files, int(description["input"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    parser.add_argument("--inputs", type=int, default=2000, help="how many inputs (2000)")
    parser.add_argument("--seed", type=int, default=1, help="run seed (1)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory", type=int, default=1024, help="address space per worker, MiB")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per input (10)")
    parser.add_argument("--save", type=Path, default=Path(__file__).parent / "found")
    args = parser.parse_args(argv)

    seeds = all_seeds()
    started = time.monotonic()
    outcomes: collections.Counter[str] = collections.Counter()
    failures: dict[str, list[int]] = {}
    context = multiprocessing.get_context("fork")
    with context.Pool(
        args.workers, _init, (seeds, args.memory << 20, args.timeout), maxtasksperchild=2000
    ) as pool:
        work = ((args.seed, n) for n in range(args.inputs))
        for count, (number, outcome, failure, done) in enumerate(
            pool.imap_unordered(run_one, work, chunksize=16), 1
        ):
            outcomes["failed" if failure else outcome.split(":")[0]] += 1
            if count % 20_000 == 0:
                print(f"fuzz: {count} inputs, {len(failures)} distinct failures", flush=True)
            if failure is None:
                continue
            signature = failure.splitlines()[0]
            if signature not in failures:
                print(f"fuzz: input {number} ({'; '.join(done)}): {failure}", file=sys.stderr)
                files = make_input(seeds, args.seed, number)
                name = f"seed{args.seed}-input{number}"
                save_input(
                    args.save / name,
                    files,
                    {"seed": args.seed, "input": number, "mutations": done, "failure": failure},
                )
            failures.setdefault(signature, []).append(number)
    elapsed = time.monotonic() - started
    for signature, numbers in failures.items():
        print(f"fuzz: {len(numbers)} inputs failed with {signature} (first: {numbers[0]})")
    print(
        f"fuzz: {args.inputs} inputs from seed {args.seed} in {elapsed:.0f} s "
        f"({args.inputs / elapsed:.0f}/s): "
        + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))
        + f"; distinct failures={len(failures)}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
