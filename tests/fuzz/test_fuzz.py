"""The fuzz suite's fast tier: kept regressions, a hypothesis-driven run, a short sampled run
under an address-space limit, and a sample through the real commands.

The long run (10^6 inputs) is ``python -m tests.fuzz.run --inputs 1000000`` (see README).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.mutate import Files, mutate
from tests.fuzz.run import load_input, make_input
from tests.fuzz.seeds import Seed, all_seeds, built_seeds
from tests.fuzz.target import exercise, materialize

REGRESSIONS = sorted((Path(__file__).parent / "regressions").iterdir())
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression(case: Path, tmp_path: Path) -> None:
    files, number = load_input(case)
    leaf = materialize(tmp_path, files)
    exercise(tmp_path, leaf, number)


_SMALL_SEEDS: list[Seed] = []


def _small_seeds() -> list[Seed]:
    if not _SMALL_SEEDS:
        _SMALL_SEEDS.extend(built_seeds())
    return _SMALL_SEEDS


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutated_images(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    seeds = _small_seeds()
    seed = seeds[data.draw(st.integers(0, len(seeds) - 1))]
    files = Files(dict(seed.files), seed.leaf, [seed.name])

    def draw(low: int, high: int) -> int:
        return data.draw(st.integers(low, high))

    for _ in range(draw(1, 3)):
        mutate(draw, files)
    folder = tmp_path_factory.mktemp("input")
    exercise(folder, materialize(folder, files), draw(0, 1000))


def test_short_run_under_memory_limit() -> None:
    # Separate processes with an address-space limit and an alarm, as the long run has.
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", "--inputs", "2500", "--seed", "20261129",
         "--memory", "768", "--save", "/dev/null/none"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "distinct failures=0" in result.stdout.splitlines()[-1]


def test_inputs_are_reproducible() -> None:
    seeds = all_seeds()
    first, again = make_input(seeds, 5, 42), make_input(seeds, 5, 42)
    assert first.done == again.done
    assert first.data == again.data
