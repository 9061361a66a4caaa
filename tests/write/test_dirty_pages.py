"""DirtyPages against a model: what runs and patches return, and what memory it counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vhdfs.disk.dirty import PAGE, DirtyPages

SECTOR = 512

writes = st.lists(
    st.tuples(st.integers(0, 63), st.integers(1, 40), st.booleans(), st.binary(min_size=1)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(writes)
def test_runs_and_patches_match_a_model(program: list[tuple[int, int, bool, bytes]]) -> None:
    pages = DirtyPages()
    model: dict[int, bytes] = {}
    for first, count, as_view, seed in program:
        data = (seed * (count * SECTOR // len(seed) + 1))[: count * SECTOR]
        pages.store(first * SECTOR, memoryview(data) if as_view else data)
        for n in range(count):
            model[first + n] = data[n * SECTOR : (n + 1) * SECTOR]
    seen: dict[int, bytes] = {}
    previous_end = -1
    for start, chunks in pages.runs():
        joined = b"".join(bytes(chunk) for chunk in chunks)
        # Runs come in disk order, each as long as it can be (never touching the next).
        assert start > previous_end
        for n in range(len(joined) // SECTOR):
            seen[start // SECTOR + n] = joined[n * SECTOR : (n + 1) * SECTOR]
        previous_end = start + len(joined)
    assert seen == model
    for sector in range(120):
        found = pages.patches(sector * SECTOR, SECTOR)
        assert (found[0][1] if found else None) == model.get(sector)
        assert pages.overlaps(sector * SECTOR, SECTOR) == (
            any(s in model for s in range(sector // 8 * 8, sector // 8 * 8 + 8))
        )


def test_a_large_write_is_one_chunk_and_counted_once() -> None:
    pages = DirtyPages()
    data = bytes(range(256)) * (1 << 12)  # 1 MiB
    pages.store(3 * SECTOR, data)  # not page aligned: a partial page at each end
    runs = list(pages.runs())
    assert [(start, [len(c) for c in chunks]) for start, chunks in runs] == [
        (3 * SECTOR, [PAGE - 3 * SECTOR, (1 << 20) - PAGE, 3 * SECTOR])
    ]
    assert b"".join(bytes(c) for c in runs[0][1]) == data
    assert pages.size == len(data) + 2 * PAGE
    pages.store(3 * SECTOR, bytes(len(data)))  # overwritten whole: the first buffer is freed
    assert pages.size == len(data) + 2 * PAGE
