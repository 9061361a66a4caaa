"""Host calls that may never return, given a time limit.

A path inside a FUSE mount whose daemon is stopped, or on a network file system whose server
is gone, makes ``stat``, ``realpath``, ``open`` and ``read`` wait in the kernel for an answer
that may never come, and a locator may name such a path. ``bounded`` runs the work of finding
and opening one file in a daemon thread and waits for it at most a time limit. A thread that
misses the limit is abandoned: if its work completes after all, what it opened is closed
there (``discard``). It cannot be stopped earlier, but it does not hold the process either:
the kernel waits for a FUSE answer killably, and daemon threads end with the process.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from vhdfs.errors import StalledPathError, VhdfsError

#: Seconds that finding and opening one image file (``stat``, ``realpath``, ``open`` and the
#: reads that validate it) may take before its path is reported as stalled. A healthy local
#: or network file system answers in milliseconds; ten seconds leave room for a disk that
#: spins up or a server that fails over.
LOOKUP_TIME_LIMIT = 10.0

T = TypeVar("T")


class _Attempt(Generic[T]):
    """One piece of work in its thread, and whether anyone still waits for it."""

    def __init__(self, work: Callable[[], T], discard: Callable[[T], None] | None) -> None:
        self._work = work
        self._discard = discard
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            result = self._work()
        except BaseException as exc:  # handed to the waiting thread, or dropped
            with self._lock:
                self.error = exc
                self.done.set()
            return
        with self._lock:
            late = self.abandoned
            if not late:
                self.result = result
                self.done.set()
        if late and self._discard is not None:
            # Nobody will use what was opened: close it here, or it would leak. A failure
            # to close has nobody to be reported to either.
            with contextlib.suppress(VhdfsError, OSError):
                self._discard(result)

    def abandon(self) -> bool:
        """Give up waiting; return False if the work finished just before."""
        with self._lock:
            if self.done.is_set():
                return False
            self.abandoned = True
            return True


def bounded(
    work: Callable[[], T],
    *,
    path: str,
    limit: float = LOOKUP_TIME_LIMIT,
    discard: Callable[[T], None] | None = None,
    purpose: str = "",
) -> T:
    """Run ``work`` (which looks up or opens ``path``) and return its result within ``limit``.

    Args:
        work: The lookup and open; what it raises is raised here.
        path: The file ``work`` is about, named by the error.
        limit: Seconds to wait.
        discard: Closes what ``work`` returns, should it return after the limit.
        purpose: Why ``path`` was looked at, added to the error (``"the parent of X"``).

    Raises:
        StalledPathError: No answer within ``limit``.
    """
    attempt = _Attempt(work, discard)
    thread = threading.Thread(target=attempt.run, name="vhdfs-lookup", daemon=True)
    thread.start()
    try:
        finished = attempt.done.wait(limit)
    except BaseException:
        attempt.abandon()  # interrupted (Ctrl-C): the late result is closed by the thread
        raise
    if not finished and attempt.abandon():
        why = f", looking for {purpose}" if purpose else ""
        raise StalledPathError(path, f"no answer within {limit:g} s (a stalled mount?){why}")
    # The thread has nothing left to do but return; joining it keeps no thread alive past
    # this call (the daemon forks later).
    thread.join()
    if attempt.error is not None:
        raise attempt.error
    return cast(T, attempt.result)
