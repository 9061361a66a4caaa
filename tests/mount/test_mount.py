"""Real mounts through the vhdfs command: layouts, start-up contract, shutdown, errors."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.files import tree_hashes
from tests.support.images import BuiltChain, Layer, build_chain
from tests.support.mounting import Mount, is_mounted, vhdfs_command
from vhdfs.daemon.lifecycle import _open_disks
from vhdfs.daemon.options import PASS_THROUGH_FLAGS, parse_mount_options
from vhdfs.image.create import create_dynamic

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = 6 * MiB + 3 * 512


@pytest.fixture
def chain3(tmp_path: Path) -> BuiltChain:
    layers = [
        Layer(kind="fixed", writes=[(0, 64), (5000, 300)]),
        Layer(block_size=512 << 10, writes=[(3, 5), (4999, 2), (12000, 7)]),
        Layer(block_size=4096, writes=[(1, 1), (4096, 4096)]),
    ]
    return build_chain(tmp_path / "chain", SIZE, layers)


def _vhdfs(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhdfs_command(), *map(str, args)], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_directory_mount_serves_each_image(
    tmp_path: Path, chain3: BuiltChain, mount: Callable[..., Mount]
) -> None:
    other = build_chain(tmp_path / "other", 2 * MiB, [Layer(writes=[(7, 9)])], seed=7)
    m = mount([chain3.leaf, other.leaf.rename(other.leaf.with_name("second.vhd"))])
    assert sorted(os.listdir(m.mountpoint)) == ["layer2.raw", "second.raw"]
    assert Path(m.raw("layer2.raw")).read_bytes() == chain3.expected
    assert Path(m.raw("second.raw")).read_bytes() == other.expected
    st_raw = os.stat(m.raw("layer2.raw"))
    assert st_raw.st_size == SIZE
    assert st_raw.st_mode & 0o777 == 0o644  # the image's own bits: read-write by default
    assert m.stop() == 0
    assert not is_mounted(m.mountpoint)


def test_images_of_one_mount_share_its_cache_and_dirty_limit(
    tmp_path: Path, chain3: BuiltChain
) -> None:
    other = build_chain(tmp_path / "other", 2 * MiB, [Layer(writes=[(7, 9)])], seed=7)
    options = parse_mount_options(["cache_size=64M,dirty_limit=32M"])
    with contextlib.ExitStack() as stack:
        disks = _open_disks([str(chain3.leaf), str(other.leaf)], options, stack)
        assert [d.cache._lru.max_bytes for d in disks] == [32 * MiB, 32 * MiB]
        assert [d.writeback.dirty_limit for d in disks if d.writeback] == [16 * MiB, 16 * MiB]


def test_regular_file_mountpoint(
    tmp_path: Path, chain3: BuiltChain, mount: Callable[..., Mount]
) -> None:
    target = tmp_path / "disk.raw"
    target.touch()
    m = mount([chain3.leaf], target)
    assert os.path.getsize(target) == SIZE
    assert target.read_bytes() == chain3.expected
    assert m.stop() == 0
    assert os.path.getsize(target) == 0


def test_returns_only_when_ready_and_exits_cleanly(tmp_path: Path, chain3: BuiltChain) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = Mount([str(chain3.leaf)], str(mountpoint))
    pidfile = tmp_path / "vhdfs.pid"
    try:
        result = _vhdfs(chain3.leaf, mountpoint, "-o", f"pidfile={pidfile}")
        assert (result.returncode, result.stderr) == (0, "")
        # No waiting, no polling: the command returned, so the file must be readable now.
        with open(mountpoint / "layer2.raw", "rb") as f:
            assert f.read(8192) == chain3.expected[:8192]
        m.pid = int(pidfile.read_text())
        assert m.pid != os.getpid()
        assert m.stop() == 0
        assert not pidfile.exists()  # removed by the daemon on its way out
    finally:
        m.cleanup()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts(
    sig: signal.Signals, chain3: BuiltChain, mount: Callable[..., Mount]
) -> None:
    m = mount([chain3.leaf])
    assert m.pid is not None
    os.kill(m.pid, sig)
    assert m.wait_exited() == 0
    assert not is_mounted(m.mountpoint)


def test_foreground_ctrl_c(chain3: BuiltChain, mount: Callable[..., Mount]) -> None:
    m = mount([chain3.leaf], foreground=True, options=["cache_size=2M"])
    assert m.process is not None
    assert Path(m.raw("layer2.raw")).read_bytes()[:4096] == chain3.expected[:4096]
    m.process.send_signal(signal.SIGINT)
    assert m.wait_exited() == 0
    assert not is_mounted(m.mountpoint)


def test_options_after_positionals(
    chain3: BuiltChain, mount: Callable[..., Mount], tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    # The order mount.fuse3 uses: IMAGE MOUNTPOINT -o OPTIONS, with fstab words mixed in.
    pidfile = tmp_path / "vhdfs.pid"
    result = _vhdfs(
        chain3.leaf,
        mountpoint,
        "-o",
        f"ro,defaults,nofail,x-systemd.automount,noatime,pidfile={pidfile}",
    )
    assert (result.returncode, result.stderr) == (0, "")
    m = Mount([], str(mountpoint))
    m.pid = int(pidfile.read_text())
    try:
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if line.split()[4] == str(mountpoint))
        assert " fuse.vhdfs " in line
        assert f" {chain3.leaf} " in line
        assert m.stop() == 0
    finally:
        m.cleanup()


def _assert_refused(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr == f"vhdfs: {message}\n"


def test_bad_image_leaves_nothing_behind(tmp_path: Path) -> None:
    image = tmp_path / "bad.vhd"
    image.write_bytes(os.urandom(4096))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = tree_hashes(tmp_path)
    result = _vhdfs(image, mountpoint)
    _assert_refused(result, 3, f"{image}: not a VHD image: no 'conectix' cookie in the footer")
    assert not is_mounted(str(mountpoint))
    assert tree_hashes(tmp_path) == before


def test_usage_errors(tmp_path: Path, chain3: BuiltChain) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    _assert_refused(
        _vhdfs("-o", "ro,bogus", chain3.leaf, mountpoint),
        2,
        "unknown mount option 'bogus' (see vhdfs --help)",
    )
    _assert_refused(
        _vhdfs("-o", "cache_size=12Q", chain3.leaf, mountpoint),
        2,
        "cache_size: not a size: '12Q' (use a number with an optional K, M, G, T or P)",
    )
    _assert_refused(
        _vhdfs(chain3.leaf, tmp_path / "missing"),
        5,
        f"{tmp_path / 'missing'}: cannot use as mountpoint: No such file or directory",
    )
    twin = tmp_path / "twin"
    twin.mkdir()
    create_dynamic(str(twin / "layer2.vhd"), MiB)
    _assert_refused(
        _vhdfs(chain3.leaf, twin / "layer2.vhd", mountpoint),
        2,
        f"images {chain3.leaf}, {twin / 'layer2.vhd'} would all be served as layer2.raw",
    )
    assert not is_mounted(str(mountpoint))


def test_teardown_escalates_to_kill(chain3: BuiltChain, mount: Callable[..., Mount]) -> None:
    # A daemon that no longer responds must still be cleaned up, by its own PID only.
    m = mount([chain3.leaf])
    pid = m.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(AssertionError, match="unmount of"):
        m.stop(timeout=1)
    assert not is_mounted(m.mountpoint)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped


@pytest.fixture(scope="module")
def big_chain(tmp_path_factory: pytest.TempPathFactory) -> BuiltChain:
    layers = [
        Layer(block_size=2 << 20, writes=[(0, 3000), (9000, 4000)]),
        Layer(block_size=64 << 10, writes=[(17, 33), (2999, 2), (8191, 300), (16000, 1)]),
        Layer(block_size=512 << 10, writes=[(18, 1), (9001, 7), (16380, 4)]),
    ]
    return build_chain(tmp_path_factory.mktemp("big"), 8 * MiB + 1024, layers)


@pytest.fixture(scope="module")
def big_mount(big_chain: BuiltChain, tmp_path_factory: pytest.TempPathFactory):
    mountpoint = tmp_path_factory.mktemp("mnt")
    m = Mount([str(big_chain.leaf)], str(mountpoint), ["cache_size=1M"]).start()
    try:
        yield m
    finally:
        m.cleanup()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(offset=st.integers(0, 8 * MiB + 2048), length=st.integers(0, 600_000))
def test_random_reads_through_the_mount(
    big_chain: BuiltChain, big_mount: Mount, offset: int, length: int
) -> None:
    # O_DIRECT keeps the kernel's page cache out of the way: every read reaches vhdfs.
    fd = os.open(big_mount.raw("layer2.raw"), os.O_RDONLY | os.O_DIRECT)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    assert data == bytes(big_chain.expected[offset : offset + length])


def test_mount_of_huge_sparse_image_is_instant_and_small(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "huge.vhd"
    create_dynamic(str(image), 2040 << 30)
    started = time.monotonic()
    m = mount([image])
    assert os.path.getsize(m.raw("huge.raw")) == 2040 << 30
    with open(f"/proc/{m.pid}/status") as f:
        rss_kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    # Memory is measured, time only reported: the 4 MiB BAT is never held whole.
    assert rss_kib < 80 * 1024, rss_kib
    with open(m.raw("huge.raw"), "rb") as f:
        f.seek((2040 << 30) - 4096)
        assert f.read() == bytes(4096)
    print(
        f"mounted a 2040 GiB sparse image in {time.monotonic() - started:.2f} s, RSS {rss_kib} KiB"
    )
    assert m.stop() == 0


def test_every_pass_through_flag_and_an_awkward_path(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    folder = tmp_path / "odd, näme"
    folder.mkdir()
    image = folder / "disk ü,1.vhd"
    create_dynamic(str(image), MiB)
    flags = sorted(PASS_THROUGH_FLAGS - {"allow_root"})  # allow_root excludes allow_other
    m = mount([image], options=[",".join(flags)])
    assert os.listdir(m.mountpoint) == ["disk ü,1.raw"]
    assert Path(m.raw("disk ü,1.raw")).read_bytes() == bytes(MiB)
    assert m.stop() == 0
