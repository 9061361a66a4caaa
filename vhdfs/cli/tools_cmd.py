"""``vhd convert``, ``commit``, ``compact`` and ``resize``: their arguments and their output.

Each reports what it did in one line (or as JSON with ``--json``) and shows progress on
stderr for long work (``vhdfs.cli.progress``). The work itself is ``vhdfs.tools``'.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from dataclasses import asdict
from functools import partial
from typing import Any

import trio

from vhdfs.cli.info import render_json
from vhdfs.cli.progress import ProgressLine
from vhdfs.daemon.mounts import mount_of
from vhdfs.errors import ExitCode, ImageBusyError, UsageError
from vhdfs.image.create import DEFAULT_BLOCK_SIZE, check_block_size
from vhdfs.text import printable
from vhdfs.tools.compact import compact
from vhdfs.tools.compare import compare
from vhdfs.tools.convert import ConvertRequest, convert
from vhdfs.tools.merge import commit
from vhdfs.tools.resize import resize
from vhdfs.units import format_size, parse_size

log = logging.getLogger(__name__)

_CONVERT_EPILOG = """\
SRC is a VHD (a differencing image brings its whole chain, flattened) or, when it is not a
VHD or with -f raw, a raw disk image. The output is a new VHD, or a raw file with -O raw.
Ranges that read as zeros are skipped: not allocated in a dynamic VHD, holes in a fixed VHD
or a raw file. DST is never overwritten; a failed run leaves no DST behind.
"""
_COMMIT_EPILOG = """\
Afterwards the parent reads exactly as CHILD read before, and CHILD is empty (it reads
through to the parent) or, with --remove, gone. Other differencing images made on the same
parent read the changed parent from then on. Both files must be free: a mounted one is
refused. An interrupted commit leaves every image valid; run it again to finish.
"""
_COMPACT_EPILOG = """\
Blocks that hold nothing become unallocated (all zeros in a dynamic image; no sector in a
differencing image), leaked space is reclaimed, blocks move down and the file shrinks. To
give back the free space of a guest file system, zero it first: zerofree for ext2/3/4 (on
the unmounted file system), sdelete -z inside Windows. fstrim does not help: FUSE has no
discard for vhdfs to receive.
"""
_COMPARE_EPILOG = """\
Each of A and B is a VHD (a differencing image brings its whole chain) or, when it is not a
VHD or with -f/-F raw, a raw disk image; any mix. Exit status 0 when both disks have the same
size and the same bytes, 1 when they differ (the first differing offset, or the two sizes, is
printed); other statuses as for every command.
"""
_RESIZE_EPILOG = """\
Grows a fixed or dynamic image (a dynamic image's BAT moves to the end of the file when it
has no room). Shrinking needs --shrink and is refused while data lies past the new end.
The guest's partitions and file systems are not resized: do that inside the guest.
"""


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="report as JSON")


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show progress on stderr even when it is not a terminal",
    )


def parents_option(parser: argparse.ArgumentParser) -> None:
    """``--parents DIR``, for every subcommand that follows a chain's locators."""
    parser.add_argument(
        "--parents",
        metavar="DIR",
        help="open only parents that lie inside DIR, symbolic links resolved (for images "
        "made by others)",
    )


def add_parsers(sub: Any) -> None:
    """Add the tools' subcommands to the ``vhd`` parser."""
    formatter = argparse.RawDescriptionHelpFormatter
    convert_parser = sub.add_parser(
        "convert",
        help="convert a VHD (or chain) or a raw file into a new VHD or raw file",
        description="Convert SRC into the new file DST.",
        epilog=_CONVERT_EPILOG,
        formatter_class=formatter,
    )
    convert_parser.add_argument("source", metavar="SRC")
    convert_parser.add_argument("destination", metavar="DST")
    convert_parser.add_argument(
        "-f", dest="source_format", choices=("vhd", "raw"), default="auto", help="SRC format"
    )
    convert_parser.add_argument(
        "-O", dest="output", choices=("vhd", "raw"), default="vhd", help="DST format (vhd)"
    )
    convert_parser.add_argument(
        "-t", "--type", choices=("dynamic", "fixed"), default="dynamic", help="DST VHD type"
    )
    convert_parser.add_argument(
        "-b",
        "--block-size",
        default=None,
        metavar="SIZE",
        help=f"block size of a dynamic DST (default {format_size(DEFAULT_BLOCK_SIZE)})",
    )
    convert_parser.add_argument(
        "--azure",
        action="store_true",
        help="a fixed VHD with the size rounded up to a whole MiB, as Azure requires",
    )
    parents_option(convert_parser)
    _progress_option(convert_parser)
    _json_option(convert_parser)

    commit_parser = sub.add_parser(
        "commit",
        help="write a differencing image's data into its parent",
        description="Commit CHILD into its parent, like qemu-img commit.",
        epilog=_COMMIT_EPILOG,
        formatter_class=formatter,
    )
    commit_parser.add_argument("child", metavar="CHILD")
    commit_parser.add_argument(
        "--all", action="store_true", help="commit down to the base, level by level"
    )
    commit_parser.add_argument(
        "--remove", action="store_true", help="remove each committed image instead of emptying it"
    )
    parents_option(commit_parser)
    _progress_option(commit_parser)
    _json_option(commit_parser)

    compact_parser = sub.add_parser(
        "compact",
        help="give back unused space of a dynamic or differencing image, in place",
        description="Compact IMAGE in place.",
        epilog=_COMPACT_EPILOG,
        formatter_class=formatter,
    )
    compact_parser.add_argument("image", metavar="IMAGE")
    _progress_option(compact_parser)
    _json_option(compact_parser)

    compare_parser = sub.add_parser(
        "compare",
        help="tell whether two disks (VHD chains or raw files) hold the same bytes",
        description="Compare the disks of A and B byte for byte.",
        epilog=_COMPARE_EPILOG,
        formatter_class=formatter,
    )
    compare_parser.add_argument("first", metavar="A")
    compare_parser.add_argument("second", metavar="B")
    compare_parser.add_argument(
        "-f", dest="first_format", choices=("vhd", "raw"), default="auto", help="A's format"
    )
    compare_parser.add_argument(
        "-F", dest="second_format", choices=("vhd", "raw"), default="auto", help="B's format"
    )
    parents_option(compare_parser)
    _progress_option(compare_parser)
    _json_option(compare_parser)

    resize_parser = sub.add_parser(
        "resize",
        help="change the virtual size of a fixed or dynamic image",
        description="Give IMAGE the virtual size SIZE (e.g. 40G).",
        epilog=_RESIZE_EPILOG,
        formatter_class=formatter,
    )
    resize_parser.add_argument("image", metavar="IMAGE")
    resize_parser.add_argument("size", metavar="SIZE")
    resize_parser.add_argument("--shrink", action="store_true", help="allow a smaller size")
    _json_option(resize_parser)


def _emit(as_json: bool, document: dict[str, Any], line: str) -> int:
    print(render_json({**document, "exit_code": 0}) if as_json else printable(line))
    return ExitCode.OK


def run_convert(args: argparse.Namespace) -> int:
    """``vhd convert``."""
    block_size = DEFAULT_BLOCK_SIZE
    if args.block_size is not None:
        block_size = _size(args.block_size, "block size")
        check_block_size(block_size)
    if args.output == "raw" and (args.azure or args.type == "fixed" or args.block_size):
        raise UsageError(None, "-O raw makes a raw file: drop --type, --block-size and --azure")
    request = ConvertRequest(
        args.source,
        args.destination,
        args.source_format,
        args.output,
        args.type,
        block_size,
        args.azure,
        args.parents,
    )
    progress = ProgressLine(f"converting {args.source}", args.progress)
    report = trio.run(convert, request, progress)
    progress.finish()
    kind = f"{report.kind} VHD" if report.kind else "raw file"
    return _emit(
        args.json,
        asdict(report),
        f"converted {report.source} ({report.source_format}) into {report.destination}: {kind}, "
        f"{format_size(report.virtual_size)}, {format_size(report.data_bytes)} of data",
    )


def run_commit(args: argparse.Namespace) -> int:
    """``vhd commit``."""
    progress = ProgressLine(f"committing {args.child}", args.progress)
    report = trio.run(_commit, args.child, args.all, args.remove, progress, args.parents)
    progress.finish()
    for _, parent in report.levels:
        log.warning(
            "note: %s changed; other differencing images made on it read the change too", parent
        )
    document = {
        "image": report.image,
        "levels": [{"child": c, "parent": p} for c, p in report.levels],
        "bytes_committed": report.bytes_committed,
        "removed": report.removed,
    }
    last_parent = report.levels[-1][1]
    action = "removed" if report.removed else "emptied"
    return _emit(
        args.json,
        document,
        f"committed {format_size(report.bytes_committed)} of {report.image} into {last_parent}"
        f" ({len(report.levels)} level(s)); {action} {', '.join(c for c, _ in report.levels)}",
    )


async def _commit(
    child: str, all_levels: bool, remove: bool, progress: ProgressLine, parents: str | None
) -> Any:
    return await commit(
        child, all_levels=all_levels, remove=remove, progress=progress, parents=parents
    )


def run_compact(args: argparse.Namespace) -> int:
    """``vhd compact``."""
    progress = ProgressLine(f"compacting {args.image}", args.progress)
    report = compact(args.image, progress)
    progress.finish()
    kept = "; all-zero blocks kept (blktap batmap)" if report.kept_zero_blocks else ""
    return _emit(
        args.json,
        {**asdict(report), "bytes_reclaimed": report.bytes_reclaimed},
        f"compacted {report.image}: {format_size(report.bytes_reclaimed)} reclaimed "
        f"({format_size(report.old_size)} -> {format_size(report.new_size)}), "
        f"{report.blocks_dropped} block(s) dropped, {report.blocks_moved} moved{kept}",
    )


def run_compare(args: argparse.Namespace) -> int:
    """``vhd compare``: 0 identical, 1 different."""
    progress = ProgressLine(f"comparing {args.first} with {args.second}", args.progress)
    report = trio.run(
        partial(
            compare,
            args.first,
            args.second,
            formats=(args.first_format, args.second_format),
            parents=args.parents,
            progress=progress,
        )
    )
    progress.finish()
    if report.identical:
        line = f"{report.first} and {report.second} are identical ({report.first_size} bytes)"
    elif report.first_size != report.second_size:
        line = (
            f"{report.first} and {report.second} differ in size: {report.first_size} and "
            f"{report.second_size} bytes"
        )
    else:
        line = f"{report.first} and {report.second} differ at offset {report.first_difference}"
    status = ExitCode.OK if report.identical else ExitCode.FAILURE
    document = {**asdict(report), "identical": report.identical, "exit_code": int(status)}
    print(render_json(document) if args.json else printable(line))
    return status


def run_resize(args: argparse.Namespace) -> int:
    """``vhd resize``."""
    report = resize(args.image, _size(args.size, "size"), shrink=args.shrink)
    moved = "; the BAT moved to the end of the file" if report.relocated_table else ""
    return _emit(
        args.json,
        asdict(report),
        f"resized {report.image}: {format_size(report.old_size)} -> "
        f"{format_size(report.new_size)} ({report.new_size} bytes){moved}",
    )


def name_holder(exc: ImageBusyError) -> ImageBusyError:
    """``exc`` naming the vhdfs mount that holds its image, when a vhdfs mount does.

    The tools only see a lock held by another program (``tools/`` knows nothing of mounts);
    a vhdfs mount carries the canonical path of its image as its source, so the mount table
    tells which one it is, and how to let go of it.
    """
    if exc.path is None:
        return exc
    holder = mount_of(exc.path)
    if holder is None:
        return exc
    return ImageBusyError(
        exc.path,
        f"in use by the vhdfs mount at {holder} (unmount it first: vhdfs -u {shlex.quote(holder)})",
    )


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(None, f"{what}: {exc}") from None


RUNNERS = {
    "convert": run_convert,
    "commit": run_commit,
    "compact": run_compact,
    "compare": run_compare,
    "resize": run_resize,
}
