"""Creating new fixed, dynamic and differencing images (``vhd create``).

Layout of a new dynamic or differencing image::

    0       footer copy
    512     dynamic header
    1536    BAT, every entry unallocated, padded to whole sectors with 0xFF
            parent locators (differencing only), each in its own sector-aligned area
    ...     trailing footer

Choices that matter to other tools:

* Creator ``vhfs``. Geometry is the spec's CHS when it describes the size exactly, otherwise
  65535/16/255, so QEMU (which sizes unknown creators by geometry) agrees on the size.
* Original size = Current size: libvhdi sizes disks by Original size.
* A child stores the parent's base name in the header (the only thing vhdimount looks at), a
  relative W2ru locator, an absolute W2ku locator (POSIX path with backslashes) and an absolute
  MacX URL; its parent time stamp is the parent file's mtime, as blktap and DiscUtils write it.

The new file is created exclusively (never overwriting anything), written, then fsynced
together with its directory.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from urllib.parse import quote

from vhdfs import __version__
from vhdfs.errors import HostIOError, UsageError
from vhdfs.format.bat import empty_table, table_bytes
from vhdfs.format.geometry import geometry_to_store
from vhdfs.format.layout import (
    FEATURE_RESERVED,
    FIXED_DATA_OFFSET,
    FOOTER_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    HEADER_VERSION,
    SECTOR,
    VHD_EPOCH,
    DiskType,
    PlatformCode,
)
from vhdfs.format.records import (
    EMPTY_LOCATOR,
    DynamicHeader,
    Footer,
    ParentLocator,
    build_dynamic_header,
    build_footer,
    encode_parent_name,
)
from vhdfs.image.chain import Chain

CREATOR_APP = b"vhfs"
# The spec defines only "Wi2k" and "Mac " as host OS codes; QEMU writes "Wi2k" too.
CREATOR_OS = b"Wi2k"
DEFAULT_BLOCK_SIZE = 2 << 20
#: QEMU's and Windows' limit for every VHD type: 2040 GiB.
MAX_SIZE = 0xFF000000 * SECTOR
#: Block sizes blktap and Virtual PC are known to open.
WIDELY_SUPPORTED_BLOCK_SIZES = (512 << 10, 2 << 20)
#: Largest BAT ``vhd create`` writes; tiny blocks on a huge disk would need gigabytes of table.
MAX_TABLE_BYTES = 64 << 20


def _creator_version() -> int:
    major, minor = (int(part) for part in __version__.split(".")[:2])
    return major << 16 | minor


def _vhd_timestamp(unix_time: float) -> int:
    return max(0, int(unix_time) - VHD_EPOCH) & 0xFFFFFFFF


def check_size(size: int) -> None:
    """Refuse sizes no VHD can have.

    Raises:
        UsageError: Not a positive multiple of 512, or above 2040 GiB.
    """
    if size <= 0 or size % SECTOR:
        raise UsageError(None, f"size {size} is not a positive multiple of 512 bytes")
    if size > MAX_SIZE:
        raise UsageError(None, f"size {size} exceeds the VHD maximum of 2040 GiB")


def check_block_size(block_size: int) -> None:
    """Refuse block sizes that are not a power of two from 512 bytes to 256 MiB.

    Raises:
        UsageError: The block size is invalid.
    """
    if block_size < SECTOR or block_size & (block_size - 1) or block_size > 256 << 20:
        raise UsageError(
            None, f"block size {block_size} is not a power of two from 512 bytes to 256 MiB"
        )


def new_footer(
    size: int, disk_type: DiskType, data_offset: int, *, geometry_source: Footer | None = None
) -> Footer:
    """A footer for a new image of ``size`` bytes (sizes and geometry from a parent if given)."""
    geometry = geometry_to_store(size) if geometry_source is None else geometry_source.geometry
    return Footer(
        features=FEATURE_RESERVED,
        format_version=FORMAT_VERSION,
        data_offset=data_offset,
        timestamp=_vhd_timestamp(time.time()),
        creator_app=CREATOR_APP,
        creator_version=_creator_version(),
        creator_os=CREATOR_OS,
        original_size=size,
        current_size=size,
        geometry=geometry,
        disk_type=disk_type,
        checksum=0,
        unique_id=uuid.uuid4().bytes,
        saved_state=0,
        reserved=bytes(427),
    )


def create_fixed(path: str, size: int) -> Footer:
    """Create a fixed image of ``size`` bytes (sparse on the host: the data is a hole)."""
    check_size(size)
    footer = new_footer(size, DiskType.FIXED, FIXED_DATA_OFFSET)
    _write_new(path, [(size, build_footer(footer))], size + FOOTER_SIZE)
    return footer


def create_dynamic(path: str, size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Footer:
    """Create an empty dynamic image."""
    check_size(size)
    check_block_size(block_size)
    footer = new_footer(size, DiskType.DYNAMIC, SECTOR)
    _write_sparse_image(path, footer, block_size, parent=None)
    return footer


def create_differencing(
    path: str,
    parent_path: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    parents: str | None = None,
    mode: int | None = 0o644,
) -> Footer:
    """Create an empty child of ``parent_path``, which must open as a complete chain.

    ``parents`` confines the parents of ``parent_path`` to a folder (``Chain.open``).
    ``mode``: the new file's permission bits (less the umask), set as it is created; ``None``
    takes what every layer of the parent's chain grants, never group- or other-writable.
    """
    check_block_size(block_size)
    chain = Chain.open(parent_path, lock=False, parents=parents)
    try:
        parent = chain.leaf
        footer = new_footer(
            parent.footer.current_size,
            DiskType.DIFFERENCING,
            SECTOR,
            geometry_source=parent.footer,
        )
        if mode is None:
            mode = least_open_mode(chain) & 0o644
        parent_mtime = os.fstat(parent.file.fd).st_mtime
        parent_abs = os.path.abspath(parent.path)
        _write_sparse_image(
            path,
            footer,
            block_size,
            parent=(parent.footer.unique_id, parent_mtime, parent_abs),
            mode=mode,
        )
    finally:
        chain.close()
    return footer


def least_open_mode(chain: Chain) -> int:
    """The permission bits that the chain's every layer grants, seen from the leaf's owner.

    Each class of the result (owner, group, others) gets only what each layer grants that
    class: a layer of another owner counts with its group bits for the leaf's owner if it
    shares the leaf's group, else with its bits for others. So a raw file or a new child is
    never more open than the most private layer under it.
    """
    leaf = os.fstat(chain.leaf.file.fd)
    bits = 0o777
    for layer in chain.layers:
        st = os.fstat(layer.file.fd)
        mode = stat.S_IMODE(st.st_mode)
        others = mode & 0o7
        group = (mode >> 3) & 0o7 if st.st_gid == leaf.st_gid else others
        owner = (mode >> 6) & 0o7 if st.st_uid == leaf.st_uid else group
        bits &= owner << 6 | group << 3 | others
    return bits


def _locator_payloads(child_path: str, parent_abs: str) -> list[tuple[int, bytes]]:
    child_dir = os.path.dirname(os.path.abspath(child_path))
    relative = os.path.relpath(parent_abs, child_dir).replace("/", "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    return [
        (PlatformCode.W2RU, relative.encode("utf-16-le")),
        (PlatformCode.W2KU, parent_abs.replace("/", "\\").encode("utf-16-le")),
        (PlatformCode.MACX, ("file://" + quote(parent_abs)).encode("utf-8")),
    ]


def _write_sparse_image(
    path: str,
    footer: Footer,
    block_size: int,
    parent: tuple[bytes, float, str] | None,
    mode: int = 0o644,
) -> None:
    entries = -(-footer.current_size // block_size)
    if table_bytes(entries) > MAX_TABLE_BYTES:
        raise UsageError(
            path,
            f"{entries} blocks of {block_size} bytes would need a "
            f"{table_bytes(entries) >> 20} MiB BAT; choose a larger block size",
        )
    table_offset = SECTOR + HEADER_SIZE
    pieces: list[tuple[int, bytes]] = [(table_offset, empty_table(entries))]
    next_offset = table_offset + table_bytes(entries)
    locators: list[ParentLocator] = []
    parent_id, parent_time, parent_name = bytes(16), 0, b"\0" * 512
    if parent is not None:
        parent_id, parent_mtime, parent_abs = parent
        parent_time = _vhd_timestamp(parent_mtime)
        parent_name = encode_parent_name(os.path.basename(parent_abs))
        for code, payload in _locator_payloads(path, parent_abs):
            space = -(-len(payload) // SECTOR) * SECTOR
            locators.append(ParentLocator(code, space, len(payload), 0, next_offset))
            pieces.append((next_offset, payload))
            next_offset += space
    header = DynamicHeader(
        data_offset=FIXED_DATA_OFFSET,
        table_offset=table_offset,
        header_version=HEADER_VERSION,
        max_table_entries=entries,
        block_size=block_size,
        checksum=0,
        parent_unique_id=parent_id,
        parent_timestamp=parent_time,
        parent_name_raw=parent_name,
        locators=tuple(locators) + (EMPTY_LOCATOR,) * (8 - len(locators)),
    )
    raw_footer = build_footer(footer)
    pieces[:0] = [(0, raw_footer), (SECTOR, build_dynamic_header(header))]
    pieces.append((next_offset, raw_footer))
    _write_new(path, pieces, next_offset + FOOTER_SIZE, mode)


def _write_new(path: str, pieces: list[tuple[int, bytes]], size: int, mode: int = 0o644) -> None:
    """Create ``path`` exclusively with ``pieces`` written at their offsets, then fsync.

    ``O_EXCL`` also refuses a symlink planted at ``path``: it is never followed.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UsageError(path, "already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise UsageError(path, f"cannot create: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        os.unlink(path)
        if isinstance(exc, OSError):
            raise HostIOError(path, f"cannot write: {exc.strerror}", exc.errno) from exc
        raise
    os.close(fd)
    try:
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise HostIOError(
            path, f"created, but its folder could not be synced: {exc.strerror}", exc.errno
        ) from exc
