"""Finding the footer to trust: the trailing one (512 or 511 bytes), else the copy at offset 0.

Every image ends with a footer; pre-2004 Virtual PC wrote it as 511 bytes (the file size is
then ``512 n + 511``). Dynamic and differencing images also carry a copy at offset 0, which a
crashed tapdisk or a truncated copy may leave as the only valid one. A fixed image has no copy:
its offset 0 is guest data, never read as a footer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vhdfs.errors import ImageError, NotAVhdError, Notice, OtherFormatError
from vhdfs.format.layout import FOOTER_SIZE, OLD_FOOTER_SIZE, SECTOR, VHDX_SIGNATURE, DiskType
from vhdfs.format.records import Footer, parse_footer
from vhdfs.image.hostfile import HostFile


@dataclass(frozen=True, slots=True)
class FooterLocation:
    """Where the footer that was used came from, and the state of the other copy."""

    footer: Footer
    #: Length of the trailing footer (512, or 511 for pre-2004 Virtual PC); 0 when missing.
    trailing_length: int
    #: Offset of the trailing footer (file size - its length); the end of usable data.
    trailing_offset: int
    #: True when the copy at offset 0 exists and equals the footer used.
    copy_matches: bool
    #: The footer exactly as stored (512 bytes), rewritten verbatim when it moves.
    raw: bytes = b""
    #: A problem worth a warning once the image has opened (a footer copy was used...).
    note: Notice | None = None

    @property
    def data_limit(self) -> int:
        """End of the area structures may occupy: the trailing footer, or EOF without one."""
        return self.trailing_offset


def locate_footer(file: HostFile) -> FooterLocation:
    """Find the footer to trust: trailing first (512 or 511 bytes), then the copy at 0.

    Raises:
        NotAVhdError: No footer anywhere (the message names VHDX files as such).
        ImageError: The footers there are damaged (the most specific problem is reported).
    """
    size = file.size
    if size < FOOTER_SIZE - 1:
        raise NotAVhdError(file.path, f"not a VHD image: the file is only {size} bytes")
    head = file.pread(0, FOOTER_SIZE)
    _refuse_other_formats(file.path, head)
    trailing_length = OLD_FOOTER_SIZE if size % SECTOR == OLD_FOOTER_SIZE else FOOTER_SIZE
    trailing_offset = size - trailing_length
    trailing_raw = file.pread(trailing_offset, trailing_length).ljust(FOOTER_SIZE, b"\0")
    trailing, trailing_error = _try_footer(file, trailing_raw, "footer")
    copy, copy_error = None, None
    if trailing_offset > 0 and (trailing is None or trailing.disk_type != DiskType.FIXED):
        copy, copy_error = _try_footer(file, head, "footer copy at offset 0")
        if copy is not None and copy.disk_type == DiskType.FIXED:
            copy = None  # offset 0 of a fixed disk is guest data, never a footer copy
    if trailing is not None:
        note = None
        if copy is not None and copy != trailing:
            note = Notice(
                "footer-copy-differs",
                "the footer copy at offset 0 differs from the trailing footer; using the latter",
            )
        return FooterLocation(
            trailing, trailing_length, trailing_offset, copy == trailing, trailing_raw, note
        )
    assert trailing_error is not None
    if copy is not None:
        note = Notice(
            "trailing-footer-unusable",
            f"trailing footer unusable ({trailing_error.message}); using the copy at offset 0",
        )
        return FooterLocation(copy, 0, size, True, head, note)
    # Report the most specific problem: a damaged footer beats "no footer at all".
    if isinstance(trailing_error, NotAVhdError) and not isinstance(copy_error, NotAVhdError | None):
        raise copy_error
    raise trailing_error


#: Other disk image formats, by what their files start with: (name, qemu-img format).
_OTHER_FORMATS = (
    (VHDX_SIGNATURE, "VHDX", "vhdx"),
    (b"QFI\xfb", "qcow2", "qcow2"),
    (b"KDMV", "VMDK", "vmdk"),
    (b"# Disk DescriptorFile", "VMDK descriptor", "vmdk"),
    (b"COWD", "VMDK (ESX)", "vmdk"),
)
_VDI_SIGNATURE = (0x40, b"\x7f\x10\xda\xbe")


def _refuse_other_formats(path: str, head: bytes) -> None:
    """Name a qcow2, VMDK, VDI or VHDX file as such, with the conversion that makes a VHD."""
    found = next(
        ((name, fmt) for magic, name, fmt in _OTHER_FORMATS if head.startswith(magic)), None
    )
    offset, magic = _VDI_SIGNATURE
    if found is None and head[offset : offset + len(magic)] == magic:
        found = ("VDI (VirtualBox)", "vdi")
    if found is not None:
        name, fmt = found
        target = os.path.splitext(os.path.basename(path))[0] + ".vhd"
        raise OtherFormatError(
            path,
            f"this is a {name} image, not a VHD; make a VHD of it with: qemu-img convert -f "
            f"{fmt} -O vpc -o subformat=dynamic,force_size=on {path} {target}",
        )


def _try_footer(
    file: HostFile, raw: bytes, where: str
) -> tuple[Footer, None] | tuple[None, ImageError]:
    try:
        return parse_footer(raw, file.path, where=where), None
    except ImageError as exc:
        return None, exc
