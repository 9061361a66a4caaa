"""Logging set-up and the one-line error format shared by ``vhdfs``, ``vhd`` and the daemon.

Every line goes through ``printable``: messages carry paths and locator text from images.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from vhdfs.text import printable


class _PrintableFormatter(logging.Formatter):
    """Log lines with non-printable characters escaped.

    Messages carry paths and locator text from images, which must neither forge a second line
    nor reach a terminal raw.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def setup_logging(program: str, *, debug: bool = False) -> None:
    """Log to stderr as ``program: message`` (WARNING and up, everything with ``debug``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter(f"{program}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def log_to_syslog(program: str) -> None:
    """Send further log records to syslog (used once the daemon has left the terminal)."""
    root = logging.getLogger()
    if os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(_PrintableFormatter(f"{program}[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.handlers[:] = [handler]


def error(program: str, message: object) -> None:
    """Print one error line to stderr."""
    print(f"{program}: {printable(str(message))}", file=sys.stderr, flush=True)
