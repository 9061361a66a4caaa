"""The one translation of exceptions into FUSE replies.

pyfuse3 answers a request with an error only for ``FUSEError``; any other exception escapes
``pyfuse3.main`` and leaves the request unanswered. So every handler runs inside
``fuse_errors``, or calls ``raise_fuse_error`` from a plain ``except`` (the hot ``read`` and
``write``: a ``try`` costs nothing until something is raised). vhdfs errors become their own
errno, host OS errors keep theirs, and anything else is a bug, logged with its traceback and
answered with EIO.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pyfuse3

from vhdfs.errors import VhdfsError

log = logging.getLogger(__name__)


def raise_fuse_error(operation: str, exc: Exception) -> NoReturn:
    """Answer a request whose handler raised ``exc``: raise its ``FUSEError`` (logged here)."""
    if isinstance(exc, pyfuse3.FUSEError):
        raise exc
    if isinstance(exc, VhdfsError):
        log.error("%s: %s", operation, exc)
        raise pyfuse3.FUSEError(exc.errno) from exc
    if isinstance(exc, OSError):
        log.error("%s: %s", operation, exc)
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
    log.error("%s: unexpected error", operation, exc_info=exc)
    raise pyfuse3.FUSEError(errno.EIO) from exc


@contextmanager
def fuse_errors(operation: str) -> Iterator[None]:
    """Run a handler body, turning every exception into a ``FUSEError``."""
    try:
        yield
    except Exception as exc:
        raise_fuse_error(operation, exc)
