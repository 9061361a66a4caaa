"""Sizes with units, as users type them ("2G", "512M", "1.5GiB", "4096") and as we print them.

Units are binary (K = 1024), like qemu-img and dd: a "1G" disk is 1 GiB.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(?:I?B)?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary unit suffix.

    Args:
        text: For example ``"4096"``, ``"512K"``, ``"2M"``, ``"1.5G"``, ``"10GiB"``.

    Returns:
        The size in bytes (a fraction is rounded down to a whole byte).

    Raises:
        ValueError: The text is not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G, T or P)")
    number, unit = match.groups()
    factor = _UNITS[(unit or "").upper()]
    if "." in number:
        whole, frac = number.split(".")
        scale: int = 10 ** len(frac)
        return int(whole) * factor + int(frac) * factor // scale
    return int(number) * factor


def format_size(size: int) -> str:
    """Render a byte count for people: exact bytes below 1 KiB, else two decimals and a unit."""
    if size < 1024:
        return f"{size} B"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    value = size / 1024
    index = 0
    while value >= 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text} {units[index]}"
