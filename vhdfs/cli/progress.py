"""Progress of long work on stderr: for a person at a terminal, or when asked (``--progress``).

Nothing is shown for work that ends within ``DELAY`` seconds. On a terminal the line is
rewritten in place a few times a second; elsewhere (``--progress`` into a log) a new line is
written every ``LOG_INTERVAL`` seconds. The last report ends the line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vhdfs.units import format_size

#: Seconds of work before anything is shown.
DELAY = 2.0
#: Seconds between updates on a terminal, and between lines elsewhere.
TERMINAL_INTERVAL = 0.25
LOG_INTERVAL = 5.0


class ProgressLine:
    """Reports ``(done, total)`` byte counts of one job called ``what``.

    Args:
        what: What is being done, e.g. ``"converting disk.vhd"``.
        enabled: ``True`` forces it on, ``False`` off; ``None`` shows it on a terminal only.
        stream: Where to write (stderr).
    """

    def __init__(
        self, what: str, enabled: bool | None = None, stream: TextIO | None = None
    ) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.enabled = self.terminal if enabled is None else enabled
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        """Report that ``done`` of ``total`` bytes are done."""
        if not self.enabled:
            return
        now = time.monotonic()
        interval = TERMINAL_INTERVAL if self.terminal else LOG_INTERVAL
        if now - self.started < DELAY or (now - self._last < interval and done < total):
            return
        self._last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        percent = 100 * done // total if total else 100
        left = f", {int((total - done) / rate)} s left" if rate > 0 and done < total else ""
        line = (
            f"vhd: {self.what}: {format_size(done)} of {format_size(total)} ({percent}%), "
            f"{format_size(int(rate))}/s{left}"
        )
        if self.terminal:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        """End the line, if one was shown."""
        if self._shown and self.terminal:
            self.stream.write("\n")
            self.stream.flush()
