"""Text that came from an image or from the file system, made safe to print on one line.

A locator path is bytes from the image, and a file name may hold any byte but ``/`` and NUL:
either can carry a newline (which would forge a second line of output), an escape sequence
(which a terminal would obey) or an undecodable byte (which ``print`` cannot encode). Every
message that reaches a terminal, a log or a report line goes through ``printable``.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""Return ``text`` with every non-printable character escaped as ``\xNN``/``\uNNNN``.

    Printable characters (letters of every script, spaces, punctuation) stay as they are, so
    ordinary paths read unchanged; control characters, line and paragraph separators, and the
    lone surrogates that stand for undecodable bytes in file names become escapes.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)
