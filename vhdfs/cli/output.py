"""Logging set-up and the one-line error format shared by ``vhdfs`` and ``vhd``."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def setup_logging(program: str, *, debug: bool = False) -> None:
    """Log to stderr as ``program: message`` (WARNING and up, everything with ``debug``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{program}: %(message)s"))
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
        handler.setFormatter(logging.Formatter(f"{program}[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.handlers[:] = [handler]


def error(program: str, message: object) -> None:
    """Print one error line to stderr."""
    print(f"{program}: {message}", file=sys.stderr, flush=True)
