"""``vhd check``: structural verification of an image and its whole chain. It never writes.

Each layer is opened, read-only, with every check a mount makes (those of ``VhdImage.open``:
checksums, versions, header fields, BAT entries inside the file, clear of metadata and of each
other, locators), then checked further for what does not stop a read-only open: the footer
copy at offset 0 against the trailing footer, the state that makes an image unsafe to write,
and space that nothing references (what an interrupted block allocation leaves: harmless, but
worth knowing). Parents are followed as the chain resolves them, with their unique ids checked.

Severity: ``error`` (the image is damaged or unusable), ``interrupted`` (an operation of
``vhd`` was stopped part-way: every reader sees a valid image, and the message names the
command that finishes it), ``warning`` (usable but unusual), ``leak`` (unreferenced space, what
an interrupted block allocation or compaction leaves; ``vhd compact`` reclaims it). The exit
status is 0 with neither errors nor interrupted operations, 1 with errors, 2 when a file cannot
be read at all, 3 when the only problem is an interrupted operation.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from vhdfs.errors import HostIOError, ImageAccessError, ImageBusyError, VhdfsError
from vhdfs.format.layout import FOOTER_SIZE, SECTOR, UNALLOCATED, DiskType
from vhdfs.image.chain import Chain
from vhdfs.image.regions import iter_sorted
from vhdfs.image.vhd import VhdImage
from vhdfs.text import printable

#: Block data is aligned to this; shorter gaps before aligned data are padding, not leaks.
PADDING = 4096


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in one file."""

    severity: str  # "error", "interrupted", "warning" or "leak"
    path: str
    message: str
    #: A stable name of the kind of finding, for ``--json`` (the error's or notice's code).
    code: str = "error"

    def __str__(self) -> str:
        # One finding, one line: a path from a locator must not forge another.
        return printable(f"{self.severity}: {self.path}: {self.message}")


@dataclass
class CheckReport:
    """Everything ``vhd check`` found, layer by layer."""

    image: str
    layers: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unreadable: bool = False
    leaked_bytes: int = 0

    @property
    def exit_code(self) -> int:
        """The exit status of ``vhd check``.

        0 clean (leaks and warnings allowed), 1 errors found, 2 a file could not be read, 3 an
        interrupted operation and nothing worse.
        """
        if self.unreadable:
            return 2
        if any(f.severity == "error" for f in self.findings):
            return 1
        return 3 if any(f.severity == "interrupted" for f in self.findings) else 0


def check_chain(path: str, *, azure: bool = False, parents: str | None = None) -> CheckReport:
    """Check ``path`` and every parent; never raises for problems in the images.

    With ``azure``, also Azure's rules for an uploaded disk: a fixed image whose virtual size
    is a whole number of MiB. ``parents`` confines the parents to a folder (``Chain.open``).
    """
    report = CheckReport(image=path)
    try:
        chain, chain_error = Chain.open_partial(path, writable=False, lock=True, parents=parents)
    except VhdfsError as exc:
        _record_open_failure(report, path, exc)
        return report
    try:
        for image in chain.layers:
            report.layers.append(image.path)
            _check_layer(image, report)
        if azure:
            _check_azure(chain.leaf, report)
        if chain_error is not None:
            _record_open_failure(report, chain_error.path or path, chain_error)
    finally:
        chain.close()
    return report


def _check_azure(image: VhdImage, report: CheckReport) -> None:
    if image.kind != DiskType.FIXED:
        report.findings.append(
            Finding(
                "error",
                image.path,
                "Azure takes fixed images only (vhd convert --azure makes one)",
                "azure-not-fixed",
            )
        )
    if image.virtual_size % (1 << 20):
        report.findings.append(
            Finding(
                "error",
                image.path,
                f"virtual size {image.virtual_size} is not a whole number of MiB, as Azure "
                "requires (vhd convert --azure rounds it up)",
                "azure-size",
            )
        )


def _record_open_failure(report: CheckReport, path: str, exc: VhdfsError) -> None:
    # A damaged image is a finding; a file that cannot be read at all (or is being written
    # by someone else right now) means the check could not be done.
    if isinstance(exc, ImageAccessError | ImageBusyError | HostIOError):
        report.unreadable = True
    report.findings.append(Finding("error", exc.path or path, exc.message, exc.code))


def _check_layer(image: VhdImage, report: CheckReport) -> None:
    problem = image.write_problem()
    interrupted = problem is not None and problem.code == "interrupted-resize"
    for warning in image.warnings:
        if warning == problem or (interrupted and warning.code == "footer-copy-differs"):
            continue  # reported once, below, as what it is
        report.findings.append(Finding("warning", image.path, warning.message, warning.code))
    if problem is not None:
        harmless = image.footer.saved_state or problem in image.write_hazards
        severity = "warning" if harmless else "error"
        if interrupted:
            severity = "interrupted"
        report.findings.append(Finding(severity, image.path, problem.message, problem.code))
    if image.kind == DiskType.FIXED:
        return
    leaked = _leaks(image)
    for start, end in leaked:
        report.findings.append(
            Finding(
                "leak",
                image.path,
                f"{end - start} bytes at offset {start} are unreferenced",
                "leaked-space",
            )
        )
        report.leaked_bytes += end - start


def _leaks(image: VhdImage) -> list[tuple[int, int]]:
    """Ranges of the file that no structure references, alignment padding excepted.

    Padding is what allocators leave between structures: a gap shorter than 4 KiB that is
    either shorter than a block (no block can be lost in it: MiniVHD leaves 2.5 KiB gaps) or
    lies right before a block whose data is 4 KiB-aligned, or before a trailing footer at a
    position aligned the same way, as Windows and vhdfs place them. Anything else that is
    unreferenced is a leak, however small.

    Blocks are kept as 4-byte starts (opening bounded their number by what the file can hold)
    and walked in order by ``iter_sorted``, in bounded extra memory.
    """
    starts = array("I")
    for page_no in range(image.bat_pages):
        entries = image.read_bat_page(page_no)
        if entries.count(UNALLOCATED) < len(entries):
            starts.extend(entry for entry in entries if entry != UNALLOCATED)
    footer_at = image.file.size - (image.trailing_footer_length or FOOTER_SIZE)
    others = [(r.start, r.end, False) for r in image.reserved]
    others.append((footer_at, image.file.size, (footer_at + image.bitmap_size) % PADDING == 0))
    leaks = []
    position = 0
    for start, end, aligned in _in_order(image, starts, others):
        gap = start - position
        padding = gap < PADDING and (aligned or gap < image.block_span)
        if gap > 0 and not padding:
            leaks.append((position, start))
        position = max(position, end)
    return leaks


def _in_order(
    image: VhdImage, starts: array[int], others: list[tuple[int, int, bool]]
) -> Iterator[tuple[int, int, bool]]:
    """Blocks (given by start sector) and the few other used ranges, in order of start.

    Each as ``(start, end, aligned)``: aligned when the block's data is 4 KiB-aligned (for
    ``others``, as given).
    """
    pending = sorted(others, reverse=True)
    span = image.block_span
    for entry in iter_sorted(starts):
        start = entry * SECTOR
        while pending and pending[-1][0] <= start:
            yield pending.pop()
        yield start, start + span, (start + image.bitmap_size) % PADDING == 0
    yield from reversed(pending)
