#!/usr/bin/env bash
# Set up .venv if needed and run the demo: SVI vs MAP on 1-D regression with a gap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pbnn.apps.demo "$@"
