"""``vhd``: image tools (``info``, ``check``, ``create``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from vhdfs import __version__
from vhdfs.cli.info import chain_report, failed_report, render_json, render_text
from vhdfs.cli.resources import raise_open_file_limit
from vhdfs.cli.tools_cmd import RUNNERS, add_parsers, name_holder, parents_option
from vhdfs.errors import ExitCode, ImageBusyError, UsageError, VhdfsError
from vhdfs.image.chain import Chain
from vhdfs.image.check import check_chain
from vhdfs.image.create import (
    DEFAULT_BLOCK_SIZE,
    WIDELY_SUPPORTED_BLOCK_SIZES,
    create_differencing,
    create_dynamic,
    create_fixed,
)
from vhdfs.logs import error, setup_logging
from vhdfs.text import printable
from vhdfs.units import format_size, parse_size

log = logging.getLogger(__name__)
PROGRAM = "vhd"

_EPILOG = """\
examples:
  vhd create disk.vhd 20G                         # dynamic, 2 MiB blocks
  vhd create --type fixed --size 512M azure.vhd   # fixed (sparse on the host)
  vhd create --parent base.vhd snapshot.vhd       # differencing child of base.vhd
  vhd info snapshot.vhd                           # the whole chain
  vhd info --json disk.vhd | jq .virtual_size
  vhd check snapshot.vhd                          # verify the whole chain
  vhd convert snapshot.vhd flat.vhd               # flatten a chain into one image
  vhd convert --azure disk.img upload.vhd         # a raw disk into a fixed VHD for Azure
  vhd commit snapshot.vhd                         # merge a snapshot into its parent
  vhd compact disk.vhd                            # give back unused space
  vhd compare snapshot.vhd flat.img               # same bytes? (exit 0, else 1)
  vhd resize disk.vhd 40G                         # grow

exit status:
  0 success            3 an image is unusable           6 an image is in use
  1 unexpected error   4 a parent chain is broken       7 host I/O error
  2 bad usage
  vhd check has its own: 0 no errors, 1 errors found, 2 a file cannot be read
"""

_CREATE_EPILOG = """\
SIZE takes a unit: 512 (bytes), 64K, 100M, 20G, 1T (binary units). It must be a multiple of
512 bytes and at most 2040 GiB. A child (--parent) has its parent's size.

A new child records its parent by a relative and an absolute path and by name; keep the parent
in the same folder under the same name if vhdimount (libvhdi) must open the chain too.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``vhd`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Inspect, verify, create, convert, commit, compact and resize Microsoft "
        "VHD disk images.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="describe an image and its parent chain",
        description="Describe an image: type, sizes, geometry, creator, blocks, and every "
        "parent of a differencing image with how it was found and whether its unique id "
        "matches.",
    )
    info.add_argument("image", metavar="IMAGE")
    parents_option(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")

    check = sub.add_parser(
        "check",
        help="verify the structure of an image and its parent chain (never writes)",
        description="Verify an image and every parent: checksums, the footer copy, the "
        "dynamic header, BAT entries (inside the file, clear of metadata and of each other), "
        "parent locators and unique ids, and unreferenced (leaked) space. One line per "
        "finding. Exit status: 0 clean (leaks and warnings allowed), 1 problems found, 2 a "
        "file could not be read (or is in use by a writer), 3 only an operation stopped "
        "part-way (the finding names the command that finishes it).",
    )
    check.add_argument("image", metavar="IMAGE")
    parents_option(check)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument(
        "--azure",
        action="store_true",
        help="also check Azure's rules: a fixed image of a whole number of MiB",
    )

    create = sub.add_parser(
        "create",
        help="create a new fixed, dynamic or differencing image",
        description="Create a new image. Never overwrites an existing file.",
        epilog=_CREATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("image", metavar="IMAGE", help="the file to create")
    create.add_argument("size", metavar="SIZE", nargs="?", help="virtual disk size, e.g. 20G")
    create.add_argument("-s", "--size", dest="size_option", metavar="SIZE", help="same as SIZE")
    create.add_argument(
        "-t",
        "--type",
        choices=("dynamic", "fixed"),
        default=None,
        help="image type without --parent (default: dynamic)",
    )
    create.add_argument(
        "-b",
        "--block-size",
        default=None,
        metavar="SIZE",
        help=f"block size of a dynamic or differencing image "
        f"(default {format_size(DEFAULT_BLOCK_SIZE)}; a power of two from 512 to 256M)",
    )
    create.add_argument(
        "-p", "--parent", metavar="PARENT", help="create a differencing child of PARENT"
    )
    parents_option(create)
    add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vhd``; returns the exit status."""
    # Like any filter: a closed pipe (vhd info | head) ends the program quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    raise_open_file_limit()
    args = build_parser().parse_args(argv)
    setup_logging(PROGRAM)
    try:
        if args.command == "info":
            return _info(args.image, as_json=args.json, parents=args.parents)
        if args.command == "check":
            return _check(args.image, as_json=args.json, azure=args.azure, parents=args.parents)
        if args.command in RUNNERS:
            return RUNNERS[args.command](args)
        return _create(args)
    except ImageBusyError as exc:
        busy = name_holder(exc)
        error(PROGRAM, busy)
        return busy.exit_code
    except VhdfsError as exc:
        error(PROGRAM, exc)
        return exc.exit_code


def _info(path: str, *, as_json: bool, parents: str | None) -> int:
    try:
        chain, chain_error = Chain.open_partial(path, lock=False, parents=parents)
    except VhdfsError as exc:
        if not as_json:
            raise
        print(render_json(failed_report(path, exc)))
        return exc.exit_code
    try:
        report = chain_report(list(chain.iter_layers()), chain_error)
    finally:
        chain.close()
    print(render_json(report) if as_json else render_text(report))
    return ExitCode.OK if chain_error is None else chain_error.exit_code


def _check(path: str, *, as_json: bool, azure: bool, parents: str | None) -> int:
    report = check_chain(path, azure=azure, parents=parents)
    for index, finding in enumerate(report.findings):
        if finding.code == ImageBusyError.code:  # say which vhdfs mount, if one holds it
            named = name_holder(ImageBusyError(finding.path, finding.message))
            report.findings[index] = replace(finding, message=named.message)
    if as_json:
        document = {
            "image": report.image,
            "layers": report.layers,
            "exit_code": report.exit_code,
            "leaked_bytes": report.leaked_bytes,
            "findings": [
                {"severity": f.severity, "code": f.code, "path": f.path, "message": f.message}
                for f in report.findings
            ],
        }
        print(render_json(document))
        return report.exit_code
    for finding in report.findings:
        print(finding)
    if report.exit_code == 0:
        print(
            printable(f"{path}: no errors in {len(report.layers)} image(s)")
            + (f", {report.leaked_bytes} bytes leaked" if report.leaked_bytes else "")
        )
    return report.exit_code


def _size_argument(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(None, f"{what}: {exc}") from None


def _create(args: argparse.Namespace) -> int:
    if args.size and args.size_option:
        raise UsageError(None, "give the size once (SIZE or --size)")
    size_text = args.size or args.size_option
    block_size = (
        DEFAULT_BLOCK_SIZE
        if args.block_size is None
        else _size_argument(args.block_size, "block size")
    )
    if args.parent:
        if size_text:
            raise UsageError(None, "a differencing image has its parent's size; drop SIZE")
        if args.type is not None:
            raise UsageError(None, "--type does not apply with --parent")
        footer = create_differencing(args.image, args.parent, block_size, parents=args.parents)
        kind = f"differencing (parent {args.parent})"
    else:
        if not size_text:
            raise UsageError(None, "SIZE is required without --parent")
        if args.parents is not None:
            raise UsageError(None, "--parents applies only with --parent")
        size = _size_argument(size_text, "size")
        if args.type == "fixed":
            if args.block_size is not None:
                raise UsageError(None, "--block-size does not apply to fixed images")
            footer = create_fixed(args.image, size)
            kind = "fixed"
        else:
            footer = create_dynamic(args.image, size, block_size)
            kind = f"dynamic ({format_size(block_size)} blocks)"
    if footer.disk_type != 2 and block_size not in WIDELY_SUPPORTED_BLOCK_SIZES:
        log.warning(
            "block size %s: Virtual PC and blktap only open 512 KiB and 2 MiB blocks",
            format_size(block_size),
        )
    print(
        f"created {args.image}: {kind}, {format_size(footer.current_size)} "
        f"({footer.current_size} bytes)"
    )
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
