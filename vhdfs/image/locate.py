"""Where a differencing disk's parent may be: candidate paths from locators and the name.

The order: the relative Windows locator (W2ru), the MacX
URL, the absolute Windows locator (W2ku, which blktap fills with a relative path), the deprecated
8-bit ones, and finally the header's parent name in the child's own folder (the only method
vhdimount knows). Relative paths are resolved against the folder of the child, never against
the working directory. Candidates are only computed here; ``chain`` opens and verifies them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from vhdfs.format.layout import PlatformCode
from vhdfs.format.records import ParentLocator
from vhdfs.image.vhd import VhdImage

#: Locator data longer than this is not a path (Windows' MAX_PATH is 32 767 UTF-16 units).
MAX_LOCATOR_BYTES = 65536

_ORDER = (
    PlatformCode.W2RU,
    PlatformCode.MACX,
    PlatformCode.W2KU,
    PlatformCode.WI2R,
    PlatformCode.WI2K,
)
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A path where the parent may be, and what suggested it."""

    path: str
    source: str


def parent_candidates(child: VhdImage) -> list[Candidate]:
    """Every path the parent of ``child`` may be at, best first, without duplicates."""
    header = child.header
    assert header is not None
    folder = os.path.dirname(os.path.abspath(child.path))
    found: list[Candidate] = []
    for code in _ORDER:
        for slot, locator in enumerate(header.locators):
            if locator.platform_code != code:
                continue
            text = _locator_text(child, locator)
            if text is None:
                continue
            source = f"{locator.platform_name} locator (slot {slot})"
            for path in _paths_from_locator(code, text, folder):
                found.append(Candidate(path, source))
    name = header.parent_name
    if name:
        base = re.split(r"[\\/]", name)[-1]
        if base:
            found.append(Candidate(os.path.join(folder, base), "parent name in the header"))
    unique: dict[str, Candidate] = {}
    for candidate in found:
        unique.setdefault(os.path.normpath(candidate.path), candidate)
    return [Candidate(path, c.source) for path, c in unique.items()]


def _locator_text(child: VhdImage, locator: ParentLocator) -> str | None:
    length = locator.data_length
    if length == 0 or length > MAX_LOCATOR_BYTES:
        return None
    if locator.data_offset + length > child.file.size:
        return None
    raw = child.file.pread(locator.data_offset, length)
    if locator.platform_code in (PlatformCode.W2RU, PlatformCode.W2KU):
        text = raw.decode("utf-16-le", errors="replace")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    text = text.split("\0", 1)[0].strip()
    return text or None


def _paths_from_locator(code: int, text: str, folder: str) -> list[str]:
    if code == PlatformCode.MACX:
        for prefix in ("file://localhost", "file://"):
            if text.startswith(prefix):
                text = text[len(prefix) :]
                break
        text = unquote(text)
        return [text if os.path.isabs(text) else os.path.join(folder, text)]
    return _windows_paths(text, folder)


def _windows_paths(text: str, folder: str) -> list[str]:
    """Paths for a Windows-style locator, which may also hold a POSIX path (VirtualBox)."""
    if text.startswith("\\\\"):
        # UNC path: only its file name can mean anything here.
        return [os.path.join(folder, re.split(r"[\\/]", text)[-1])]
    if _DRIVE.match(text):
        posix = text[2:].replace("\\", "/")
        return [posix, os.path.join(folder, posix.rsplit("/", 1)[-1])]
    posix = text.replace("\\", "/")
    if posix.startswith("/"):
        return [posix, os.path.join(folder, posix.rsplit("/", 1)[-1])]
    return [os.path.join(folder, posix)]
