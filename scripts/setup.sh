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
# Animal-MNIST for `--data animals`: a data-only wheel, pinned by hash. It declares tensorflow, which hwaware never
# imports (it reads the arrays, checked by SHA-256), so it is installed without dependencies.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('animal_mnist') is None)"; then
  .venv/bin/pip install --quiet --no-deps --require-hashes \
    -r <(echo "animal-mnist==0.4 --hash=sha256:aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce")
fi
# The real TensorRT bindings of every supported release (about 1 MB each), pinned by hash and NOT installed: the
# conformance test reads their names. Offline (exit 3) the test skips; a corrupt or foreign wheel (exit 2) stops here.
.venv/bin/python scripts/tensorrt_bindings.py fetch .cache/tensorrt-bindings || [ $? -eq 3 ]
