"""Small helpers for comparing files and hashing them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 and mtime of every file under ``folder``, to prove nothing was changed."""
    return {
        f"{p.relative_to(folder)}@{p.stat().st_mtime_ns}": sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
