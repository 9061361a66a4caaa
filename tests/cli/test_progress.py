"""The progress line of long vhd jobs: only past its delay, throttled, on a terminal or when
asked."""

from __future__ import annotations

import io

from vhdfs.cli.progress import DELAY, ProgressLine


def test_progress_only_when_asked_and_only_after_the_delay() -> None:
    quiet = io.StringIO()
    ProgressLine("converting x.vhd", None, quiet)(50, 100)  # not a terminal, not asked
    assert quiet.getvalue() == ""

    log = io.StringIO()
    progress = ProgressLine("converting x.vhd", True, log)
    progress(10, 100)
    assert log.getvalue() == ""  # short work shows nothing
    progress.started -= DELAY + 1
    progress(50, 100)
    progress(60, 100)  # throttled: within the interval
    progress(100, 100)  # the last report always shows
    progress.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("vhd: converting x.vhd: 50 B of 100 B (50%), ")
    assert lines[1].startswith("vhd: converting x.vhd: 100 B of 100 B (100%), ")
    assert "left" not in lines[1]
