#!/usr/bin/env bash
# Create .venv (if missing) and install hwaware with its test tools. Safe to re-run: installs only what is missing.
# Users who bring their own torch can set TORCH_SPEC="" to keep whatever is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null && [ -n "$TORCH_SPEC" ]; then
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet $TORCH_SPEC
fi
.venv/bin/pip install --quiet -e ".[dev]"
