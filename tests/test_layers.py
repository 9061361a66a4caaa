"""The layering of docs/design.md, enforced: each package imports only what lies below it.

construct is imported only in ``format/``, trio nowhere below ``disk/``, pyfuse3 only in
``fuse/`` and ``daemon/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vhdfs"
SHARED = {"errors", "text", "units", "logs", "faults", "__init__"}
#: What each part may import from vhdfs (besides itself and the shared modules).
ALLOWED = {
    "format": set(),
    "image": {"format"},
    "cache": {"format", "image"},
    "disk": {"format", "image", "cache"},
    "fuse": {"format", "image", "cache", "disk"},
    "daemon": {"format", "image", "cache", "disk", "fuse"},
    "tools": {"format", "image", "cache", "disk"},
    "cli": {"format", "image", "cache", "disk", "fuse", "daemon", "tools"},
}
#: Third-party packages and the parts that may import them.
THIRD_PARTY = {
    "construct": {"format"},
    "trio": {"disk", "daemon", "tools", "cli"},
    "pyfuse3": {"fuse", "daemon"},
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_module_imports_only_what_lies_below(path: Path) -> None:
    part = _part(path)
    for name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "vhdfs":
            target = rest.split(".")[0] if rest else "__init__"
            if part == "__main__" or target == part:
                continue
            if part in SHARED:
                assert target in SHARED, f"{part}.py is shared: it must not import vhdfs.{rest}"
            elif target not in SHARED:
                assert target in ALLOWED[part], f"{part}/ must not import vhdfs.{rest}"
        elif top in THIRD_PARTY:
            assert part in THIRD_PARTY[top], f"{part}/ must not import {top}"
