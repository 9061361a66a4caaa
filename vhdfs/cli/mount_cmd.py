"""``vhdfs``: mount VHD images as raw disk files.

Everything that can fail is done before the mount exists and before the process forks:
options are parsed, every image and parent is opened and validated, the mountpoint is checked.
A failure there prints one line and exits non-zero with nothing mounted and no file changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
from collections.abc import Sequence

import pyfuse3
import trio

from vhdfs import __version__
from vhdfs.cache.block_cache import DEFAULT_CACHE_SIZE, BlockCache
from vhdfs.cache.writeback import WriteBack
from vhdfs.cli.output import error, log_to_syslog, setup_logging
from vhdfs.daemon.daemonize import StartupPipe, detach
from vhdfs.daemon.mounts import mount_of
from vhdfs.daemon.options import MountOptions, escape_fuse_value, parse_mount_options
from vhdfs.daemon.pidfile import check_pidfile, remove_pidfile, write_pidfile
from vhdfs.daemon.serve import serve
from vhdfs.disk import VirtualDisk
from vhdfs.errors import (
    ExitCode,
    ImageBusyError,
    ImageError,
    MountError,
    ParentIdMismatchError,
    UsageError,
    VhdfsError,
)
from vhdfs.fuse.operations import RawFile, VhdfsOperations
from vhdfs.hostio import HostIO
from vhdfs.image.chain import Chain
from vhdfs.image.create import create_differencing
from vhdfs.units import format_size

log = logging.getLogger(__name__)
PROGRAM = "vhdfs"

_DESCRIPTION = """\
Mount Microsoft VHD disk images (fixed, dynamic and differencing, with parent chains of any
depth) as raw disk files, read-write. The command returns once the mount is ready and leaves a
daemon serving it; unmount with fusermount3 -u (or umount as root) to end the daemon."""

_EPILOG = f"""\
mount options (-o, comma-separated, may be repeated; also accepted after the positionals):
  rw                  read-write, the default; an image you cannot write, or one unsafe to
                      write (saved state, damaged footer), is then mounted read-only with a
                      warning, unless rw is given explicitly: then the mount is refused
  ro                  read-only
  overlay=PATH        write into the differencing image PATH on top of IMAGE (created if
                      missing; reused if its parent is IMAGE); IMAGE itself is never written
  writeback=SECONDS   written data waits in memory at most this long before it is written
                      to the image (default 5); 0 writes through
  sync                the same as writeback=0: a write returns once it is in the image, synced
  dirty_limit=SIZE    most written data held in memory; writers wait above it (default 64M)
  pidfile=PATH        write the daemon's PID to PATH once the mount is served; removed when
                      the daemon exits (wait for that before using the image elsewhere)
  cache_size=SIZE     memory for cached metadata and data, e.g. 256M
                      (default {format_size(DEFAULT_CACHE_SIZE)}, minimum 1 MiB)
  io=inline|auto|thread
                      where host reads run: inline (default) on the main thread; auto inline
                      when the host page cache holds the data, else in a worker thread (for
                      storage that serves parallel reads); thread always in a worker thread
  allow_other, allow_root, auto_unmount, default_permissions, dev, nodev, suid, nosuid,
  exec, noexec, atime, noatime, fsname=NAME, subtype=NAME
                      passed to FUSE and the kernel
  defaults, auto, noauto, user, users, nofail, _netdev, x-*, comment=, relatime, ...
                      fstab words, accepted and ignored (the README lists them all)

when written data is in the image:
  close() of the raw file returns   written into the image file (survives the daemon)
  fsync()/fdatasync() returns       written and synced (survives a power cut)
  after writeback seconds, at unmount, on SIGTERM
  the image stays valid for every other tool at every instant, crashes included

the mountpoint:
  a directory         holds one NAME.raw per IMAGE (NAME is the image file name without
                      .vhd or .avhd), sized to the virtual disk
  a regular file      (one IMAGE only) becomes the raw disk itself

examples:
  vhdfs disk.vhd /mnt/disk                    # the guest disk is /mnt/disk/disk.raw
  losetup -r -P --show -f /mnt/disk/disk.raw  # partitions appear as /dev/loopNpM
  mount -o ro /dev/loop0p1 /mnt/guest
  vhdfs snapshot.vhd /srv/vm.raw              # regular-file mountpoint
  vhdfs -o overlay=/tmp/try.vhd golden.vhd /mnt/try   # golden.vhd stays untouched
  vhdfs -f -o cache_size=256M a.vhd b.vhd /mnt/disks
  fusermount3 -u /mnt/disk                    # unmount; the daemon exits

  in /etc/fstab:
  /srv/images/disk.vhd  /mnt/disk  fuse.vhdfs  rw,allow_other,nofail  0  0

exit status:
  0  mounted (or, with -f, unmounted cleanly)
  1  unexpected error          5  the mount failed (mountpoint, FUSE, daemon start)
  2  bad usage or option       6  an image is in use by another program
  3  an image is unusable      7  host I/O error
  4  a parent chain is broken (missing parent, wrong unique id, loop)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``vhdfs`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        usage="%(prog)s [-o OPTIONS] [-f] [-d] IMAGE [IMAGE ...] MOUNTPOINT",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
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
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vhdfs``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    setup_logging(PROGRAM, debug=args.debug)
    if len(args.paths) < 2:
        parser.error("need at least one IMAGE and a MOUNTPOINT")
    try:
        options = parse_mount_options(args.options)
        return _mount(
            args.paths[:-1], args.paths[-1], options, args.foreground or args.debug, args.debug
        )
    except VhdfsError as exc:
        error(PROGRAM, exc)
        return exc.exit_code


def raw_name(image: str) -> str:
    """Name of an image's raw file: the file name without a .vhd/.avhd suffix, plus .raw."""
    base = os.path.basename(image)
    stem = re.sub(r"\.a?vhd$", "", base, flags=re.IGNORECASE) or base
    return stem + ".raw"


def _check_mountpoint(mountpoint: str, images: list[str]) -> bool:
    """Validate the mountpoint; return True for a regular-file (single disk) mountpoint."""
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        raise MountError(mountpoint, f"cannot use as mountpoint: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        if len(images) != 1:
            raise UsageError(mountpoint, "a regular-file mountpoint serves exactly one image")
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(mountpoint, "mountpoint is neither a directory nor a regular file")
    names = [raw_name(image) for image in images]
    for name in set(names):
        clashing = [image for image, n in zip(images, names, strict=True) if n == name]
        if len(clashing) > 1:
            raise UsageError(None, f"images {', '.join(clashing)} would all be served as {name}")
    return False


def _open_chain(path: str, writable: bool) -> Chain:
    """Open a chain; if it is locked, say which vhdfs mount holds it when we can tell."""
    try:
        return Chain.open(path, writable=writable)
    except ImageBusyError as exc:
        holder = mount_of(exc.path or path)
        if holder is None:
            raise
        raise ImageBusyError(exc.path, f"in use by the vhdfs mount at {holder}") from None


def _open_disk(path: str, options: MountOptions, warnings: list[str]) -> VirtualDisk:
    """Open one image for a mount, read-write unless asked or forced otherwise.

    A default (implicit ``rw``) mount falls back to read-only, with a warning, for an image the
    user cannot write or one that is unsafe to write; an explicit ``-o rw`` refuses instead.
    Warnings are added to ``warnings``, to be logged once the mount stands.
    """
    writable = not options.read_only
    if writable and not os.access(path, os.W_OK):
        _cannot_write(path, options, "you cannot write to it", warnings)
        writable = False
    chain = _open_chain(path, writable)
    if writable and (problem := chain.leaf.write_problem()) is not None:
        chain.close()
        _cannot_write(path, options, problem, warnings)
        writable = False
        chain = _open_chain(path, writable)
    warnings += [f"{layer.path}: {text}" for layer in chain.layers for text in layer.warnings]
    cache = BlockCache(chain, options.cache_size)
    hostio = HostIO(options.io_mode)
    writeback = None
    if writable:
        writeback = WriteBack(
            chain, cache, hostio, interval=options.writeback, dirty_limit=options.dirty_limit
        )
    return VirtualDisk(chain, cache, hostio, writeback)


def _cannot_write(path: str, options: MountOptions, reason: str, warnings: list[str]) -> None:
    if options.explicit_rw:
        raise ImageError(path, f"cannot mount read-write: {reason} (mount it with -o ro)")
    warnings.append(f"{path}: {reason}; mounting it read-only")


def _open_disks(images: list[str], options: MountOptions, warnings: list[str]) -> list[VirtualDisk]:
    disks: list[VirtualDisk] = []
    try:
        for image in images:
            disks.append(_open_disk(os.path.abspath(image), options, warnings))
    except BaseException:
        for disk in disks:
            disk.chain.close()
        raise
    return disks


def _prepare_overlay(images: list[str], options: MountOptions) -> tuple[str, bool]:
    """Create the overlay of ``-o overlay=`` if it does not exist.

    Returns:
        Its path, and whether it was created (so that a failed mount can remove it again).
    """
    if len(images) != 1:
        raise UsageError(None, "overlay= takes exactly one IMAGE")
    if options.read_only:
        raise UsageError(None, "overlay= mounts the overlay read-write; drop ro")
    assert options.overlay is not None
    overlay = os.path.abspath(options.overlay)
    if os.path.lexists(overlay):
        return overlay, False
    create_differencing(overlay, os.path.abspath(images[0]))
    log.info("created overlay %s on %s", overlay, images[0])
    return overlay, True


def _check_overlay_parent(disk: VirtualDisk, image: str) -> None:
    """Refuse an overlay whose parent is not ``image`` (closing it first)."""
    layers = disk.chain.layers
    if len(layers) < 2 or not os.path.samestat(os.fstat(layers[1].file.fd), os.stat(image)):
        parent = layers[1].path if len(layers) > 1 else "nothing"
        disk.chain.close()
        raise ParentIdMismatchError(
            layers[0].path, f"overlay is a child of {parent}, not of {image}"
        )


def _fuse_options(disks: list[VirtualDisk], options: MountOptions, debug: bool) -> set[str]:
    fuse = set(pyfuse3.default_options) | set(options.fuse_flags)
    fuse.add("fsname=" + escape_fuse_value(options.fsname or disks[0].chain.leaf.path))
    fuse.add("subtype=" + escape_fuse_value(options.subtype or PROGRAM))
    if all(disk.read_only for disk in disks):
        fuse.add("ro")
    if debug:
        fuse.add("debug")
    return fuse


def _mount(
    images: list[str], mountpoint: str, options: MountOptions, foreground: bool, debug: bool
) -> int:
    single_file = _check_mountpoint(mountpoint, images)
    if options.pidfile is not None:
        options.pidfile = check_pidfile(options.pidfile)
    created: str | None = None
    warnings: list[str] = []
    try:
        if options.overlay is not None:
            overlay, was_created = _prepare_overlay(images, options)
            created = overlay if was_created else None
            options.explicit_rw = True
            disks = _open_disks([overlay], options, warnings)
            _check_overlay_parent(disks[0], os.path.abspath(images[0]))
        else:
            disks = _open_disks(images, options, warnings)
        _start(images, disks, mountpoint, options, single_file, debug)
    except BaseException:
        if created is not None:
            os.unlink(created)
        raise
    # Only now: a command that fails prints its one error line and nothing else.
    for warning in dict.fromkeys(warnings):
        log.warning("%s", warning)
    pipe = None if foreground else detach(os.path.abspath(mountpoint))
    return _run(disks, pipe, options.pidfile)


def _start(
    images: list[str],
    disks: list[VirtualDisk],
    mountpoint: str,
    options: MountOptions,
    single_file: bool,
    debug: bool,
) -> None:
    """Build the file system and mount it (``pyfuse3.init``); close the disks on failure."""
    try:
        files = [
            RawFile(raw_name(image), disk, os.stat(disk.chain.leaf.path))
            for image, disk in zip(images, disks, strict=True)
        ]
        ops = VhdfsOperations(files, single_file=single_file, root_stat=os.stat(mountpoint))
        try:
            pyfuse3.init(ops, mountpoint, _fuse_options(disks, options, debug))
        except RuntimeError:
            raise MountError(mountpoint, "FUSE refused the mount (see the message above)") from None
    except BaseException:
        for disk in disks:
            disk.chain.close()
        raise


def _run(disks: list[VirtualDisk], pipe: StartupPipe | None, pidfile: str | None) -> int:
    def on_ready() -> None:
        if pidfile is not None:
            write_pidfile(pidfile)
        if pipe is not None:
            pipe.ready()
            log_to_syslog(PROGRAM)

    try:
        try:
            stopped_by_signal = trio.run(serve, disks, on_ready)
        finally:
            if pidfile is not None:
                remove_pidfile(pidfile)
    except VhdfsError as exc:
        # The final write-out failed; serve has logged which disk. The mount is finished.
        pyfuse3.close(unmount=True)
        return exc.exit_code
    except BaseException as exc:
        if pipe is not None:
            pipe.failed(f"the daemon failed during start-up: {exc!r}", ExitCode.FAILURE)
        log.exception("the daemon failed")
        pyfuse3.close(unmount=False)
        return ExitCode.FAILURE
    pyfuse3.close(unmount=stopped_by_signal)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
