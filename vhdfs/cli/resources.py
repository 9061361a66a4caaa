"""Process limits both commands set before any work.

A chain of ``MAX_CHAIN_DEPTH`` images holds that many files open at once, beside standard
streams, the FUSE device and worker threads' descriptors: more than the usual soft limit of
1024 open files. The soft limit is raised to the hard limit, which any process may do; where
the hard limit itself is lower, the deepest chains are refused with EMFILE's message.
"""

from __future__ import annotations

import contextlib
import resource


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
