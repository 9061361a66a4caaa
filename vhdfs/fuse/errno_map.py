"""The one translation of exceptions into FUSE replies.

pyfuse3 answers a request with an error only for ``FUSEError``; any other exception escapes
``pyfuse3.main`` and leaves the request unanswered. So every handler runs inside
``fuse_errors``: vhdfs errors become their own errno, host OS errors keep theirs, and anything
else is a bug, logged with its traceback and answered with EIO.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyfuse3

from vhdfs.errors import VhdfsError

log = logging.getLogger(__name__)


@contextmanager
def fuse_errors(operation: str) -> Iterator[None]:
    """Run a handler body, turning every exception into a ``FUSEError``."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except VhdfsError as exc:
        log.error("%s: %s", operation, exc)
        raise pyfuse3.FUSEError(exc.errno) from exc
    except OSError as exc:
        log.error("%s: %s", operation, exc)
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
    except Exception as exc:
        log.exception("%s: unexpected error", operation)
        raise pyfuse3.FUSEError(errno.EIO) from exc
