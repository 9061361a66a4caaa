"""The life of a mount: open, mount, daemonize, serve, tear down.

Everything that can fail is done before the mount exists and before the process forks: the
mountpoint is checked, an overlay is created if asked, every image and parent is opened and
validated. A failure there prints one line and exits non-zero with nothing mounted and no file
changed: what was opened is closed, and an overlay created for this mount is removed, by one
``ExitStack``. Once the kernel has the mount, ``serve`` owns the disks: it flushes and closes
them when serving ends, and this module ends the FUSE session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import replace

import pyfuse3
import trio

from vhdfs.cache.block_cache import MIN_CACHE_SIZE
from vhdfs.daemon.allocator import tune_allocator
from vhdfs.daemon.control import daemon_alive
from vhdfs.daemon.daemonize import StartupPipe, detach
from vhdfs.daemon.mounts import FSTYPE, mount_of, mount_of_fuse_device, top_mount_at
from vhdfs.daemon.options import MIN_DIRTY_LIMIT, FuseBytes, MountOptions, escape_fuse_value
from vhdfs.daemon.pidfile import check_pidfile, remove_pidfile, write_pidfile
from vhdfs.daemon.serve import ServeContext, serve
from vhdfs.disk.partitions import PartitionTable
from vhdfs.disk.virtual import DiskOptions, VirtualDisk, open_disk
from vhdfs.errors import (
    ExitCode,
    ImageBusyError,
    MountError,
    ParentIdMismatchError,
    UsageError,
    VhdfsError,
)
from vhdfs.fuse.operations import RawFile, VhdfsOperations
from vhdfs.image.create import create_differencing, least_open_mode
from vhdfs.logs import log_to_syslog

log = logging.getLogger(__name__)

PROGRAM = "vhdfs"


def raw_name(image: str) -> str:
    """Name of an image's raw file: the file name without a .vhd/.avhd suffix, plus .raw."""
    base = os.path.basename(image)
    stem = re.sub(r"\.a?vhd$", "", base, flags=re.IGNORECASE) or base
    return stem + ".raw"


def mount(
    images: list[str], mountpoint: str, options: MountOptions, *, foreground: bool, debug: bool
) -> int:
    """Mount ``images`` on ``mountpoint`` and serve them until unmounted; return the status.

    Without ``foreground`` the calling process returns (exits) once the mount is ready, and a
    daemon child serves it.

    Raises:
        VhdfsError: Anything that stops the mount before it exists.
    """
    handed_over = _FUSE_FD.fullmatch(mountpoint) is not None
    if handed_over:
        single_file = _check_fuse_fd(mountpoint)
    else:
        single_file = _check_mountpoint(mountpoint, images, options.partitions)
    # Resolved now: once mounted, looking at the mountpoint would ask this very process,
    # which does not serve yet.
    where = os.path.realpath(mountpoint)
    if options.pidfile is not None:
        options.pidfile = check_pidfile(options.pidfile)
    with contextlib.ExitStack() as stack:
        disks = _open_disks(images, options, stack)
        files = [
            RawFile(
                raw_name(image),
                disk,
                os.fstat(disk.chain.leaf.file.fd),
                PartitionTable(disk) if options.partitions else None,
                least_open_mode(disk.chain),
            )
            for image, disk in zip(images, disks, strict=True)
        ]
        ops = VhdfsOperations(
            files,
            single_file=single_file,
            root_stat=os.stat(mountpoint),
            ownership=options.ownership,
        )
        try:
            pyfuse3.init(ops, mountpoint, _fuse_options(disks, options, debug))
        except RuntimeError:
            raise MountError(mountpoint, "FUSE refused the mount (see the message above)") from None
        stack.pop_all()  # mounted: from here on ``serve`` owns the disks
    # Only now: a command that fails prints its one error line and nothing else.
    for warning in dict.fromkeys(w for disk in disks for w in disk.warnings):
        log.warning("%s", warning)
    if handed_over:
        # mount.fuse3 made the mount, and with drop_privileges this process has no privilege
        # left to unmount it: a stop writes everything out and leaves the unmount to whoever
        # may (vhdfs -u does it; see Shutdown).
        entry = mount_of_fuse_device(int(mountpoint.rsplit("/", 1)[1]))
        context = ServeContext(
            mountpoint=entry.mountpoint if entry is not None else None,
            device=entry.device if entry is not None else None,
            can_unmount=False,
        )
    else:
        entry = top_mount_at(where, resolved=True)
        context = ServeContext(
            mountpoint=where,
            device=entry.device if entry is not None else None,
            raw_paths=[where] if single_file else [os.path.join(where, f.name) for f in files],
        )
    pipe = None if foreground else detach(mountpoint, context.raw_paths)
    return _serve(disks, context, pipe, options.pidfile)


#: ``mount.fuse3 -o drop_privileges`` mounts itself and hands over the FUSE device.
_FUSE_FD = re.compile(r"/dev/fd/\d+")


def _check_fuse_fd(mountpoint: str) -> bool:
    """Accept a ``/dev/fd/N`` handed over by mount.fuse3; the root is then a directory."""
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        raise MountError(mountpoint, f"cannot use the FUSE device: {exc.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise MountError(mountpoint, "not an open FUSE device (drop_privileges hands one over)")
    return False


def _check_mountpoint(mountpoint: str, images: list[str], partitions: bool) -> bool:
    """Validate the mountpoint; return True for a regular-file (single disk) mountpoint."""
    entry = top_mount_at(mountpoint)
    if entry is not None and entry.fstype == FSTYPE:
        if daemon_alive(entry):
            raise MountError(
                mountpoint,
                f"already holds a vhdfs mount of {entry.source}; unmount it first "
                f"(vhdfs -u {entry.mountpoint})",
            )
        raise MountError(
            mountpoint,
            f"holds a dead vhdfs mount (its daemon is gone); remove it with "
            f"fusermount3 -u {entry.mountpoint}",
        )
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        raise MountError(mountpoint, f"cannot use as mountpoint: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        if len(images) != 1:
            raise UsageError(mountpoint, "a regular-file mountpoint serves exactly one image")
        if partitions:
            raise UsageError(mountpoint, "partitions needs a directory mountpoint")
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(mountpoint, "mountpoint is neither a directory nor a regular file")
    served: dict[str, list[str]] = {}
    for image in images:
        served.setdefault(raw_name(image), []).append(image)
    for name, clashing in served.items():
        if len(clashing) > 1:
            raise UsageError(None, f"images {', '.join(clashing)} would all be served as {name}")
    return False


def _open_disks(
    images: list[str], options: MountOptions, stack: contextlib.ExitStack
) -> list[VirtualDisk]:
    """Open every disk (the overlay's, with ``overlay=``); ``stack`` undoes it all."""
    if options.overlay is None:
        # cache_size and dirty_limit are the mount's: its images share them evenly, each
        # getting at least the minimum (so past 64 images the total is 1 MiB per image).
        share = replace(
            options.disk,
            cache_size=max(MIN_CACHE_SIZE, options.disk.cache_size // len(images)),
            dirty_limit=max(MIN_DIRTY_LIMIT, options.disk.dirty_limit // len(images)),
        )
        return [_open(os.path.abspath(image), share, stack) for image in images]
    overlay = _prepare_overlay(images, options, stack)
    disk_options = replace(options.disk, explicit_rw=True)
    disk = _open(overlay, disk_options, stack)
    _check_overlay_owner(disk)  # on the opened file: a swap after any earlier look is moot
    image = os.path.abspath(images[0])
    layers = disk.chain.layers
    if len(layers) < 2 or not os.path.samestat(os.fstat(layers[1].file.fd), os.stat(image)):
        parent = layers[1].path if len(layers) > 1 else "nothing"
        raise ParentIdMismatchError(
            layers[0].path, f"overlay is a child of {parent}, not of {image}"
        )
    return [disk]


def _open(path: str, options: DiskOptions, stack: contextlib.ExitStack) -> VirtualDisk:
    """Open one disk; if it is locked, say which vhdfs mount holds it when we can tell."""
    try:
        disk = open_disk(path, options)
    except ImageBusyError as exc:
        holder = mount_of(exc.path or path)
        if holder is None:
            raise
        raise ImageBusyError(exc.path, f"in use by the vhdfs mount at {holder}") from None
    stack.callback(disk.chain.close)
    return disk


def _check_overlay_owner(disk: VirtualDisk) -> None:
    """Refuse an existing overlay that another user owns or may write.

    Our writes would go into their file, and they could change what we read.
    """
    _refuse_foreign_overlay(disk.chain.leaf.path, os.fstat(disk.chain.leaf.file.fd))


def _refuse_foreign_overlay(path: str, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise UsageError(
            path, f"overlay belongs to another user (uid {st.st_uid}); use an overlay of your own"
        )
    if st.st_mode & 0o022:
        raise UsageError(
            path,
            "overlay may be written by other users (group or others have write permission); "
            "use an overlay only you can write",
        )


def _prepare_overlay(images: list[str], options: MountOptions, stack: contextlib.ExitStack) -> str:
    """The overlay of ``overlay=``, created if it does not exist.

    A new overlay gets the permission bits every layer of the base's chain grants, never
    group- or other-writable, so it shows their data no more openly than they do. A created
    overlay is removed again if the mount then fails.
    """
    if len(images) != 1:
        raise UsageError(None, "overlay= takes exactly one IMAGE")
    if options.disk.read_only:
        raise UsageError(None, "overlay= mounts the overlay read-write; drop ro")
    assert options.overlay is not None
    overlay = os.path.abspath(options.overlay)
    if os.path.lexists(overlay):
        # Before its locators are followed (the opened file is checked again after the open).
        with contextlib.suppress(OSError):
            _refuse_foreign_overlay(overlay, os.stat(overlay))
    else:
        base = os.path.abspath(images[0])
        create_differencing(overlay, base, parents=options.disk.parents, mode=None)
        stack.callback(os.unlink, overlay)
        log.info("created overlay %s on %s", overlay, images[0])
    return overlay


def _fuse_options(disks: list[VirtualDisk], options: MountOptions, debug: bool) -> set[str]:
    fuse = set(pyfuse3.default_options) | set(options.fuse_flags)
    # The image's canonical path, as mount(8) and umount(8) compare sources: then `umount
    # IMAGE` finds the mount and `mount -a` sees it is there. Non-ASCII paths pass as bytes.
    fsname = options.fsname or os.path.realpath(disks[0].chain.leaf.path)
    fuse.add(FuseBytes("fsname=" + escape_fuse_value(fsname)))
    fuse.add(FuseBytes("subtype=" + escape_fuse_value(options.subtype or PROGRAM)))
    if all(disk.read_only for disk in disks):
        fuse.add("ro")
    if debug:
        fuse.add("debug")
    return fuse


@contextlib.contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    try:
        yield
    finally:
        if path is not None:
            remove_pidfile(path)


def _serve(
    disks: list[VirtualDisk], context: ServeContext, pipe: StartupPipe | None, pidfile: str | None
) -> int:
    """Serve until unmounted; end the FUSE session; return the exit status."""

    def on_ready() -> None:
        if pidfile is not None:
            write_pidfile(pidfile)
        if pipe is not None:
            pipe.ready()
            log_to_syslog(PROGRAM)

    context.on_ready = on_ready
    tune_allocator()
    try:
        with _pidfile(pidfile):
            trio.run(serve, disks, context)
    except VhdfsError as exc:
        # The final write-out failed; serve has logged which disk. The mount is gone.
        pyfuse3.close(unmount=False)
        return exc.exit_code
    except BaseException as exc:
        if pipe is not None:
            pipe.failed(f"the daemon failed during start-up: {exc!r}", ExitCode.FAILURE)
        log.exception("the daemon failed")
        # Do not unmount after an internal failure: a raw file that vanishes is worse for
        # its users than one that answers ENOTCONN (auto_unmount is there for the opposite).
        pyfuse3.close(unmount=False)
        return ExitCode.FAILURE
    pyfuse3.close(unmount=False)  # serving ends when the mount is gone
    return ExitCode.OK
