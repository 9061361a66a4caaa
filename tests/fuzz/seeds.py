"""Valid images to start mutating from: every readable case of the corpus plus built ones.

A seed is a small set of files (a leaf and its parents, by path relative to one folder) with
the name of the leaf. Mutations start from real producers' layouts (qemu-img, blktap's
vhd-util, MiniVHD) and from what vhdfs and the crafting helper make, so that parsing goes deep
along every path the images take.
"""

from __future__ import annotations

import json
import lzma
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import CORPUS
from tests.support.craft import Item, Parent, craft, unique_id_of
from tests.support.images import Layer, build_chain

KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class Seed:
    """A valid image (and its parents) as bytes."""

    name: str
    leaf: str
    files: dict[str, bytes]


def corpus_seeds() -> list[Seed]:
    """Every corpus case that must read (the damaged ones are seeds of nothing new)."""
    with open(CORPUS / "manifest.json") as f:
        cases = json.load(f)["cases"]
    seeds = []
    for case in cases:
        if case["expect"] != "content":
            continue
        files = {
            name: lzma.decompress((CORPUS / "images" / case["name"] / f"{name}.xz").read_bytes())
            for name in case["files"]
        }
        seeds.append(Seed(case["name"], case["mount"], files))
    return seeds


def built_seeds() -> list[Seed]:
    """Images made here: fixed, dynamic with several block sizes, a chain, odd layouts."""
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipes = {
            "fixed": [Layer(kind="fixed", writes=[(0, 8), (1000, 30)])],
            "dynamic-4k": [Layer(block_size=4 * KiB, writes=[(0, 3), (17, 40), (500, 9)])],
            "dynamic-64k": [Layer(block_size=64 * KiB, writes=[(5, 200), (1900, 100)])],
            "chain-3": [
                Layer(writes=[(0, 100), (3000, 50)]),
                Layer(block_size=64 * KiB, writes=[(10, 20), (3020, 7)]),
                Layer(block_size=4 * KiB, writes=[(11, 1), (2999, 3)]),
            ],
        }
        for name, layers in recipes.items():
            built = build_chain(folder / name, 2 * MiB + 3 * 512, layers)
            files = {p.name: p.read_bytes() for p in built.paths}
            seeds.append(Seed(name, built.leaf.name, files))
        seeds.append(_crafted_chain(folder / "crafted"))
    return seeds


def _crafted_chain(folder: Path) -> Seed:
    folder.mkdir()
    base, child = folder / "base.vhd", folder / "child.vhd"
    block = 16 * KiB
    base_layout: list[Item] = [("gap", 3584), "header", ("block", 3), ("block", 0), "bat"]
    craft(base, size=8 * block, block_size=block, layout=base_layout, data=_blocks([3, 0], block))
    parent = Parent(
        unique_id_of(base),
        "base.vhd",
        [
            (b"W2ru", ".\\base.vhd".encode("utf-16-le")),
            (b"MacX", b"file://./base.vhd"),
            (b"W2ku", b"C\0:\0\\\0b\0a\0s\0e\0.\0v\0h\0d\0"),
        ],
    )
    child_layout: list[Item] = ["header", "bat", ("block", 5), "locators", ("block", 0)]
    bitmaps = {0: b"\x0f\xf0" + bytes(2), 5: b"\xff\xff\xff\xff"}
    craft(
        child,
        size=8 * block,
        block_size=block,
        layout=child_layout,
        data=_blocks([5, 0], block),
        bitmaps=bitmaps,
        parent=parent,
    )
    return Seed("crafted-chain", "child.vhd", {p.name: p.read_bytes() for p in (base, child)})


def _blocks(indexes: list[int], block: int) -> dict[int, bytes]:
    return {i: bytes([i + 1]) * block for i in indexes}


def all_seeds() -> list[Seed]:
    """Every seed, corpus first."""
    return corpus_seeds() + built_seeds()
