"""The -o parser: every vhdfs key, pass-through flags, fstab words, and refusals."""

from __future__ import annotations

import os

import pytest

from vhdfs.daemon.options import (
    PASS_THROUGH_FLAGS,
    FuseBytes,
    escape_fuse_value,
    parse_mount_options,
    split_options,
)
from vhdfs.disk.hostio import IoMode
from vhdfs.errors import UsageError
from vhdfs.fuse.operations import Ownership


def test_defaults_are_read_write_with_write_back() -> None:
    disk = parse_mount_options([]).disk
    assert (disk.read_only, disk.explicit_rw, disk.writeback) == (False, False, 5.0)
    assert (disk.cache_size, disk.dirty_limit) == (64 << 20, 64 << 20)
    assert disk.io_mode == IoMode.INLINE


def test_vhdfs_keys() -> None:
    options = parse_mount_options(
        ["rw,cache_size=256M", "writeback=0.5,dirty_limit=8M", "io=auto,overlay=/tmp/o.vhd"]
    )
    assert options.disk.explicit_rw
    assert options.disk.cache_size == 256 << 20
    assert options.disk.writeback == 0.5
    assert options.disk.dirty_limit == 8 << 20
    assert options.disk.io_mode == IoMode.AUTO
    assert options.overlay == "/tmp/o.vhd"
    assert parse_mount_options(["sync"]).disk.writeback == 0
    last_wins = parse_mount_options(["rw", "ro"]).disk
    assert (last_wins.read_only, last_wins.explicit_rw) == (True, False)


def test_pass_through_and_fstab_words() -> None:
    options = parse_mount_options(
        [",".join(sorted(PASS_THROUGH_FLAGS)) + ",defaults,nofail,_netdev,x-systemd.idle=1"]
    )
    assert sorted(options.fuse_flags) == sorted(PASS_THROUGH_FLAGS)
    named = parse_mount_options(["fsname=disk,subtype=vhd"])
    assert (named.fsname, named.subtype) == ("disk", "vhd")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_read=4096", "unknown mount option 'max_read=4096' (see vhdfs --help)"),
        ("kernel_cache", "unknown mount option 'kernel_cache' (see vhdfs --help)"),
        ("writeback=-1", "writeback=-1: expected seconds from 0 to 86400"),
        ("writeback=soon", "writeback=soon: expected seconds from 0 to 86400"),
        ("dirty_limit=4K", "dirty_limit 4K is below the minimum 1 MiB"),
        ("cache_size=100K", "cache_size 100K is below the minimum 1 MiB"),
        ("io=fast", "io=fast: expected one of auto, inline, thread"),
        ("overlay=", "overlay= needs the path of the overlay image"),
    ],
)
def test_refusals(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_mount_options([text])
    assert str(caught.value) == message


def test_fuse_value_escaping_and_splitting() -> None:
    escaped = escape_fuse_value("/srv/a,b\\c.vhd")
    assert escaped == "/srv/a\\,b\\\\c.vhd"
    assert split_options(f"ro,fsname={escaped},x-a") == ["ro", "fsname=/srv/a,b\\c.vhd", "x-a"]
    assert FuseBytes("fsname=/srv/Kind-ü.vhd").encode("us-ascii") == os.fsencode(
        "fsname=/srv/Kind-ü.vhd"
    )


def test_fstab_words_are_dropped_and_ownership_parsed() -> None:
    words = "defaults,async,lazytime,dirsync,silent,loud,group,owner,nosymfollow,comment=x"
    options = parse_mount_options([words + ",uid=0,gid=root,umask=027,helper=udisks"])
    assert options.fuse_flags == []
    assert options.ownership == Ownership(uid=0, gid=0, umask=0o027)
