#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (excludes `slow` and `gpu` markers). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
