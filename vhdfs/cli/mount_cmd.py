"""``vhdfs``: mount VHD images as raw disk files.

This module only parses the command line; the mount's life is ``vhdfs.daemon.lifecycle``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from vhdfs import __version__
from vhdfs.cli.resources import raise_open_file_limit
from vhdfs.daemon.control import unmount
from vhdfs.daemon.lifecycle import PROGRAM, mount
from vhdfs.daemon.options import parse_mount_options
from vhdfs.disk.virtual import DEFAULT_CACHE_SIZE, DEFAULT_DIRTY_LIMIT, DEFAULT_WRITEBACK
from vhdfs.errors import VhdfsError
from vhdfs.logs import error, setup_logging
from vhdfs.units import format_size

_DESCRIPTION = """\
Mount Microsoft VHD disk images (fixed, dynamic and differencing, with parent chains of any
depth) as raw disk files, read-write. The command returns once the mount is ready and leaves a
daemon serving it; vhdfs -u MOUNTPOINT unmounts and waits for the daemon to finish."""

#: The defaults of ``writeback=`` and ``dirty_limit=`` as one would write them in ``-o``.
_WRITEBACK = f"{DEFAULT_WRITEBACK:g}"
_DIRTY = f"{DEFAULT_DIRTY_LIMIT >> 20}M"

_EPILOG = f"""\
mount options (-o, comma-separated, may be repeated; also accepted after the positionals):
  rw                  read-write, the default; an image you cannot write, or one unsafe to
                      write (saved state, damaged footer), is then mounted read-only with a
                      warning, unless rw is given explicitly: then the mount is refused
  ro                  read-only
  overlay=PATH        write into the differencing image PATH on top of IMAGE (created if
                      missing; reused if its parent is IMAGE); IMAGE itself is never written
  parents=DIR         open only parents whose real path (symbolic links and .. resolved)
                      lies inside DIR; others are not opened at all. For images made by
                      others: their locators may name any file you can read
  partitions          also serve each MBR or GPT partition of a disk as NAME.p1, NAME.p2...
                      (numbered as Linux numbers them; they follow the table as it changes)
  writeback=SECONDS   written data waits in memory at most this long before it is written
                      to the image (default {_WRITEBACK}); 0 writes through
  sync                the same as writeback=0: a write returns once it is in the image, synced
  dirty_limit=SIZE    most written data held in memory; writers wait above it (default {_DIRTY})
  uid=USER, gid=GROUP, umask=MASK
                      owner, group and permission mask of the raw files (default: those of
                      the image file); chmod and chown on them fail with EPERM
  pidfile=PATH        write the daemon's PID to PATH once the mount is served; removed when
                      the daemon exits
  cache_size=SIZE     memory for cached metadata and data, e.g. 256M
                      (default {format_size(DEFAULT_CACHE_SIZE)}, minimum 1 MiB)
  io=inline|auto|thread
                      where host reads run: inline (default) on the main thread; auto inline
                      when the host page cache holds the data, else in a worker thread (for
                      storage that serves parallel reads); thread always in a worker thread
  allow_other, allow_root, auto_unmount, default_permissions, dev, nodev, suid, nosuid,
  exec, noexec, atime, noatime, fsname=NAME, subtype=NAME, context=...
                      passed to FUSE and the kernel
  defaults, auto, noauto, user, users, owner, group, nofail, _netdev, x-*, comment=,
  lazytime, dirsync, relatime, silent, loud, async, ...
                      words mount(8) and fstab pass, accepted and ignored (README lists all)

when written data is in the image:
  close() of the raw file returns   written into the image file (survives the daemon)
  fsync()/fdatasync() returns       written and synced (survives a power cut)
  after writeback seconds, and on unmount, vhdfs -u, SIGTERM, SIGINT, SIGHUP
  the image stays valid for every other tool at every instant, crashes included

stopping: vhdfs -u MOUNTPOINT, SIGTERM, SIGINT and SIGHUP write out and sync, then unmount;
  while a program, a loop device or a mounted guest file system uses the mount, it is not
  unmounted: the daemon serves on (writing through), names who holds it, and waits for the
  next request. vhdfs -u then exits 6.

the mountpoint:
  a directory         holds one NAME.raw per IMAGE (NAME is the image file name without
                      .vhd or .avhd), sized to the virtual disk
  a regular file      (one IMAGE only) becomes the raw disk itself

examples:
  vhdfs disk.vhd /mnt/disk                    # the guest disk is /mnt/disk/disk.raw
  losetup -r -P --show -f /mnt/disk/disk.raw  # partitions appear as /dev/loopNpM
  partx -a /dev/loop0                         # ...on kernels that parse no tables
  mount -o ro /dev/loop0p1 /mnt/guest
  vhdfs -o partitions disk.vhd /mnt/disk      # or: partition files, no loop device needed
  mount -o loop,ro /mnt/disk/disk.p1 /mnt/guest
  vhdfs snapshot.vhd /srv/vm.raw              # regular-file mountpoint
  vhdfs -o overlay=/tmp/try.vhd golden.vhd /mnt/try   # golden.vhd stays untouched
  vhdfs -f -o cache_size=256M a.vhd b.vhd /mnt/disks
  vhdfs -u /mnt/disk                          # unmount; returns when the daemon has exited

  in /etc/fstab:
  /srv/images/disk.vhd  /mnt/disk  fuse.vhdfs  rw,allow_other,nofail  0  0

exit status:
  0  mounted (or, with -f or -u, unmounted cleanly)
  1  unexpected error          5  the mount failed (mountpoint, FUSE, daemon start)
  2  bad usage or option       6  an image or the mount is in use
  3  an image is unusable      7  host I/O error (the final write-out failed)
  4  a parent chain is broken (missing parent, wrong unique id, loop)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``vhdfs`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        usage="%(prog)s [-o OPTIONS] [-f] [-d] IMAGE [IMAGE ...] MOUNTPOINT\n"
        "       %(prog)s -u MOUNTPOINT",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="IMAGE [IMAGE ...] MOUNTPOINT",
        help="VHD images to serve (a differencing image brings its whole chain), then the "
        "directory or regular file to mount on",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (see below)",
    )
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    parser.add_argument(
        "-d",
        "--debug",
        action="store_true",
        help="debug logging, FUSE requests included; implies -f",
    )
    parser.add_argument(
        "-u",
        "--unmount",
        action="store_true",
        help="unmount MOUNTPOINT and return once its daemon has written out, synced and "
        "exited; refused, naming who holds it, while the mount is in use",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vhdfs``; returns the exit status."""
    raise_open_file_limit()
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    setup_logging(PROGRAM, debug=args.debug)
    if args.unmount:
        if len(args.paths) != 1 or args.options:
            parser.error("-u takes exactly one MOUNTPOINT and no options")
        return _unmount(args.paths[0])
    if len(args.paths) < 2:
        parser.error("need at least one IMAGE and a MOUNTPOINT")
    try:
        options = parse_mount_options(args.options)
        return mount(
            args.paths[:-1],
            args.paths[-1],
            options,
            foreground=args.foreground or args.debug,
            debug=args.debug,
        )
    except VhdfsError as exc:
        error(PROGRAM, exc)
        return exc.exit_code


def _unmount(mountpoint: str) -> int:
    try:
        result = unmount(os.path.abspath(mountpoint))
    except VhdfsError as exc:
        error(PROGRAM, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        # The daemon carries on with a request it has received; only the waiting stops.
        error(PROGRAM, f"{mountpoint}: interrupted; an unmount already asked for goes on")
        return 128 + signal.SIGINT
    if result.message is not None:
        error(PROGRAM, f"{mountpoint}: {result.message}")
    return result.status


if __name__ == "__main__":
    sys.exit(main())
