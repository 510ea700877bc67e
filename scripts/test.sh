#!/usr/bin/env bash
# Set up .venv if needed, lint (ruff check, ruff format --check) and run the test suite
# (unit tests + docstring examples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
