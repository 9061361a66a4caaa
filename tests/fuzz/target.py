"""What every fuzzed input goes through, and what counts as a failure.

An input ends in one of two ways: it opens, or it is refused with one of vhdfs's own errors
(one printable line). Anything else fails: another exception, a read of the wrong length, a
finding or report that cannot be printed on one line, a read-only step that changed a file,
or, after a write into an image that ``vhd check`` passed, data that does not read back or an
image that no longer passes. Hangs and runaway memory are caught by the runner (an alarm and
an address-space limit), not here.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import trio

from tests.fuzz.mutate import Files
from vhdfs.cache.block_cache import MIN_CACHE_SIZE
from vhdfs.cli.info import chain_report, render_json, render_text
from vhdfs.disk.virtual import DiskOptions, VirtualDisk, open_disk
from vhdfs.errors import VhdfsError
from vhdfs.image.chain import Chain
from vhdfs.image.check import check_chain

#: Disks up to this size are read whole; larger ones by samples.
WHOLE_READ = 8 << 20
FIFO = "fifo"


class FuzzFailure(AssertionError):
    """An input made vhdfs do something it must never do."""


def materialize(folder: Path, files: Files) -> Path:
    """Write the input's files under ``folder`` (and a FIFO beside the leaf); return the leaf."""
    for name, data in files.data.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = files.special.get(name)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        else:
            path.write_bytes(data)
    leaf = folder / files.leaf
    fifo = leaf.parent / FIFO
    if not fifo.exists():
        os.mkfifo(fifo)
    return leaf


def _hashes(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Size, mtime and ctime of every file: any write changes them (ns resolution)."""
    out = {}
    for path in folder.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(path)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def _one_line(text: str, what: str) -> None:
    if not text.isprintable():
        raise FuzzFailure(f"{what} is not one printable line: {text!r}")


def _open_disk(leaf: Path, writable: bool) -> VirtualDisk:
    options = DiskOptions(read_only=not writable, cache_size=MIN_CACHE_SIZE, writeback=60)
    return open_disk(str(leaf), options)


def _ranges(size: int, rng: random.Random) -> list[tuple[int, int]]:
    if size <= WHOLE_READ:
        return [(offset, min(1 << 20, size - offset)) for offset in range(0, size, 1 << 20)]
    ranges = [(0, 1 << 20), (size - (1 << 20), 1 << 20), (size - 1000, 5000)]
    ranges += [(rng.randrange(size), rng.randrange(1, 70_000)) for _ in range(40)]
    return ranges


async def _read_everything(leaf: Path, rng: random.Random) -> None:
    disk = _open_disk(leaf, writable=False)
    try:
        for offset, length in _ranges(disk.size, rng):
            data = await disk.read(offset, length)
            expected = max(0, min(length, disk.size - offset))
            if len(data) != expected:
                raise FuzzFailure(f"read({offset}, {length}) returned {len(data)} bytes")
    finally:
        await disk.aclose()


async def _write_and_verify(leaf: Path, rng: random.Random) -> None:
    disk = _open_disk(leaf, writable=True)
    written: list[tuple[int, bytes]] = []
    try:
        for _ in range(rng.randrange(1, 6)):
            offset = rng.randrange(disk.size)
            data = rng.randbytes(rng.randrange(1, 20_000))
            count = await disk.write(offset, data)
            written.append((offset, data[:count]))
            if rng.randrange(3) == 0:
                await disk.flush(durable=rng.randrange(2) == 0)
        await disk.aclose()
    except VhdfsError:
        # A write may fail (no room left for a block at a lying offset): with one of our
        # own errors, and leaving a valid image, as the caller checks.
        disk.hostio.close()
        disk.chain.close()
        return
    disk = _open_disk(leaf, writable=False)
    try:
        model: dict[int, int] = {}
        for offset, data in written:
            model.update(zip(range(offset, offset + len(data)), data, strict=True))
        for offset, data in written:
            got = bytes(await disk.read(offset, len(data)))
            want = bytes(model[offset + i] for i in range(len(data)))
            if got != want:
                raise FuzzFailure(f"data written at {offset} ({len(data)} bytes) reads back wrong")
    finally:
        await disk.aclose()


def exercise(folder: Path, leaf: Path, seed: int) -> str:
    """Open, read, report and check the input; maybe write into it. Return the outcome.

    Returns:
        ``"opened"``, ``"opened+written"``, or ``"refused: <error class>"``.

    Raises:
        FuzzFailure: vhdfs did something it must never do (other exceptions escape as they are:
            they are failures too).
    """
    rng = random.Random(seed)
    before = _hashes(folder)
    report = check_chain(str(leaf))
    for finding in report.findings:
        _one_line(str(finding), "a finding")
    chain, chain_error = None, None
    try:
        chain, chain_error = Chain.open_partial(str(leaf), lock=False)
        text = render_text(chain_report(list(chain.iter_layers()), chain_error))
        for line in text.splitlines():
            _one_line(line, "a vhd info line")
        render_json(chain_report(list(chain.iter_layers()), chain_error))
        writable = chain_error is None and chain.leaf.write_problem() is None
    except VhdfsError as exc:
        _one_line(str(exc), "an error")
        if report.exit_code == 0:
            raise FuzzFailure(f"vhd check passed an image that does not open: {exc}") from exc
        return f"refused: {type(exc).__name__}"
    finally:
        if chain is not None:
            chain.close()
    if chain_error is not None:
        _one_line(str(chain_error), "an error")
        return f"refused: {type(chain_error).__name__}"
    trio.run(_read_everything, leaf, rng)
    if _hashes(folder) != before:
        raise FuzzFailure("reading changed a file")
    if not writable or report.exit_code != 0 or not chain.virtual_size or rng.randrange(4):
        return "opened"
    parents = {path: digest for path, digest in before.items() if path != str(leaf)}
    trio.run(_write_and_verify, leaf, rng)
    after = check_chain(str(leaf))
    if after.exit_code != 0:
        raise FuzzFailure(f"writing broke the image: {[str(f) for f in after.findings]}")
    if {path: _hashes(folder)[path] for path in parents} != parents:
        raise FuzzFailure("writing changed a parent")
    return "opened+written"
