#!/bin/sh
# The whole test suite: set-up, lint, type check, then every test (real FUSE mounts included).
# Extra arguments go to pytest, e.g. scripts/test.sh -k corpus
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check vhdfs tests benchmarks
.venv/bin/ruff format --check vhdfs tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
