"""Factories for test images: chains made by ``vhd create`` filled with known data, and an
in-memory model of what the disk must read as."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.vhdwrite import ImageWriter
from vhdfs.image.create import create_differencing, create_dynamic, create_fixed

SECTOR = 512


@dataclass
class Layer:
    """One layer to build: its type, block size and the sector runs written into it."""

    kind: str = "dynamic"  # base only: "dynamic" or "fixed"
    block_size: int = 2 << 20
    writes: list[tuple[int, int]] = field(default_factory=list)  # (first sector, count)


@dataclass
class BuiltChain:
    """The files of a chain (leaf first) and the bytes the virtual disk must read as."""

    paths: list[Path]
    expected: bytearray

    @property
    def leaf(self) -> Path:
        return self.paths[0]


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes that differ per seed and per position (no all-zero sectors)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(length))
    for i in range(0, length, SECTOR):
        data[i] = (seed % 255) + 1  # never a zero sector, so "absent" can't look "present"
    return bytes(data)


def build_chain(folder: Path, size: int, layers: Sequence[Layer], seed: int = 1) -> BuiltChain:
    """Create ``layers`` (base first) in ``folder``; write each layer's runs with fresh data."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = bytearray(size)
    paths: list[Path] = []
    for depth, layer in enumerate(layers):
        path = folder / f"layer{depth}.vhd"
        if depth == 0:
            if layer.kind == "fixed":
                create_fixed(str(path), size)
            else:
                create_dynamic(str(path), size, layer.block_size)
        else:
            create_differencing(str(path), str(paths[0]), layer.block_size)
        with ImageWriter(str(path)) as writer:
            for number, (first, count) in enumerate(layer.writes):
                data = pattern(seed * 1000 + depth * 100 + number, count * SECTOR)
                writer.write(first * SECTOR, data)
                expected[first * SECTOR : (first + count) * SECTOR] = data
        paths.insert(0, path)
    return BuiltChain(paths, expected)


def run(argv: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """Run a tool, failing the test with its output if it fails; return stdout."""
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result.stdout
