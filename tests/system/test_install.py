"""scripts/install.sh and scripts/uninstall.sh, into a scratch prefix: the installation works
once the source tree it came from is gone, installing twice changes nothing, and uninstalling
removes exactly what was installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from vhdfs import __version__

ROOT = Path(__file__).resolve().parents[2]
#: Not part of a source tree someone installs from.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".cache", ".*_cache", ".hypothesis", "__pycache__", "*.egg-info", "build"
)


def _script(name: str, source: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(source / "scripts" / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        cwd="/",
    )


def _tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_install_outlives_its_source_and_uninstall_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCES)
    home, prefix = tmp_path / "opt" / "vhdfs", tmp_path / "prefix"
    env = {"VHDFS_HOME": str(home), "PREFIX": str(prefix)}
    first = _script("install.sh", source, env)
    assert first.returncode == 0, first.stderr
    installed = _tree(tmp_path / "prefix")
    manifest = (home / "install-manifest").read_text()
    again = _script("install.sh", source, env)  # idempotent: the same files, the same list
    assert again.returncode == 0, again.stderr
    assert _tree(tmp_path / "prefix") == installed
    assert sorted((home / "install-manifest").read_text().splitlines()) == sorted(
        manifest.splitlines()
    )
    shutil.rmtree(source)

    assert installed == {
        "bin",
        "bin/vhdfs",
        "bin/vhd",
        "share",
        "share/man",
        "share/man/man1",
        "share/man/man1/vhdfs.1",
        "share/man/man1/vhd.1",
        "share/bash-completion",
        "share/bash-completion/completions",
        "share/bash-completion/completions/vhdfs",
        "share/bash-completion/completions/vhd",
        "lib",
        "lib/systemd",
        "lib/systemd/system",
        "lib/systemd/system/vhdfs@.service",
    }
    for program in ("vhdfs", "vhd"):
        link = prefix / "bin" / program
        assert os.readlink(link) == str(home / "bin" / program)
        result = subprocess.run([link, "--version"], capture_output=True, text=True, check=True)
        assert result.stdout == f"{program} {__version__}\n"
    # The package itself is in the virtualenv, not an editable link to a source tree.
    where = subprocess.run(
        [home / "bin" / "python", "-c", "import vhdfs; print(vhdfs.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    assert where.startswith(str(home / "lib")), where
    image = tmp_path / "d.vhd"
    created = subprocess.run(
        [prefix / "bin" / "vhd", "create", image, "8M"], capture_output=True, text=True
    )
    assert created.returncode == 0, created.stderr
    info = subprocess.run(
        [prefix / "bin" / "vhd", "info", image], capture_output=True, text=True, check=True
    )
    assert "dynamic" in info.stdout
    image.unlink()
    unit = prefix / "lib" / "systemd" / "system" / "vhdfs@.service"
    assert f"\nExecStart={prefix}/bin/vhdfs -f -o " in unit.read_text()
    for name in ("vhdfs", "vhd"):
        completion = prefix / "share" / "bash-completion" / "completions" / name
        assert completion.read_text() == (ROOT / "data" / "bash-completion" / name).read_text()

    # Something of someone else's in a folder the installation created stays, with its folders.
    foreign = prefix / "share" / "man" / "man1" / "other.1"
    foreign.write_text("not vhdfs's\n")
    removed = _script("uninstall.sh", ROOT, {"VHDFS_HOME": str(home)})
    assert removed.returncode == 0, removed.stderr
    assert _tree(tmp_path) == {
        "prefix",
        "prefix/share",
        "prefix/share/man",
        "prefix/share/man/man1",
        "prefix/share/man/man1/other.1",
    }
    assert foreign.read_text() == "not vhdfs's\n"
    nothing = _script("uninstall.sh", ROOT, {"VHDFS_HOME": str(home)})
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing to do" in nothing.stderr
    shutil.rmtree(prefix)
    assert _tree(tmp_path) == set()
