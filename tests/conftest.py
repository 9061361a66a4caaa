"""Shared fixtures: FUSE/root requirements, mounts that always unmount, the sample corpus."""

from __future__ import annotations

import lzma
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.support.mounting import Mount, become_subreaper, mount_factory

# Every property test's deadline policy: none per example. This shared 2-core machine swings
# by a third, so a per-example deadline fails at random; each test as a whole is bounded by
# pytest-timeout (pyproject.toml) instead. Tests set their own example counts.
settings.register_profile("vhdfs", deadline=None)
settings.load_profile("vhdfs")


def _corpus_dir() -> Path:
    """The sample corpus: ``tests/corpus``, or another of the same shape in $VHDFS_CORPUS."""
    if os.environ.get("VHDFS_CORPUS"):
        return Path(os.environ["VHDFS_CORPUS"])
    return Path(__file__).resolve().parent / "corpus"


CORPUS = _corpus_dir()


def _fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "mount tests need root (loop devices, mount)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    # Daemonized vhdfs processes are orphaned by their parent; as a subreaper this test
    # process inherits them, so fixtures can wait for exactly the PID they started.
    become_subreaper()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") or item.get_closest_marker("root"):
        problem = _fuse_problem()
        if problem is not None:
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the mount tests, but {problem}")
            pytest.skip(problem)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Factory for real mounts; every mount started is torn down after the test."""
    with mount_factory(tmp_path) as start:
        yield start


def unpack_case(case: dict[str, Any], target: Path) -> Path:
    """Decompress one corpus case into ``target``; return its folder."""
    folder = target / case["name"]
    for name in case["files"]:
        source = CORPUS / "images" / case["name"] / (name + ".xz")
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(lzma.decompress(source.read_bytes()))
    return folder
