"""The deepest chain documented (``MAX_CHAIN_DEPTH`` images) opens under the usual soft limit
of 1024 open files: both commands raise it to the hard limit."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mounting import VHD, Mount
from vhdfs.format.layout import SECTOR, DiskType
from vhdfs.image.chain import MAX_CHAIN_DEPTH
from vhdfs.image.create import _write_sparse_image, create_dynamic, new_footer

pytestmark = pytest.mark.fuse

MiB = 1 << 20


@contextlib.contextmanager
def _soft_open_file_limit(soft: int) -> Iterator[None]:
    """Commands started in the block inherit this soft limit (the hard one stays)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert old[1] == resource.RLIM_INFINITY or old[1] >= 2 * MAX_CHAIN_DEPTH
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def _deep_chain(folder: Path, depth: int) -> Path:
    """A chain of ``depth`` images written directly (each child names the one before)."""
    base = folder / "l0000.vhd"
    footer = create_dynamic(str(base), 4 * MiB)
    parent, parent_id = base, footer.unique_id
    for level in range(1, depth):
        child = folder / f"l{level:04d}.vhd"
        footer = new_footer(4 * MiB, DiskType.DIFFERENCING, SECTOR, geometry_source=footer)
        mtime = os.stat(parent).st_mtime
        _write_sparse_image(str(child), footer, 2 * MiB, parent=(parent_id, mtime, str(parent)))
        parent, parent_id = child, footer.unique_id
    return parent


def test_a_chain_of_the_documented_depth_opens_under_a_soft_limit_of_1024(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    leaf = _deep_chain(tmp_path, MAX_CHAIN_DEPTH)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with _soft_open_file_limit(1024):
        info = subprocess.run(
            [VHD, "info", "--json", leaf], capture_output=True, text=True, timeout=300
        )
        m = mount([leaf], mountpoint, ["ro"])
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["depth"] == MAX_CHAIN_DEPTH
    with open(m.raw(leaf.stem + ".raw"), "rb") as f:
        assert f.read() == bytes(4 * MiB)
    assert m.stop() == 0
