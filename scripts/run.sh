#!/usr/bin/env bash
# Set up (if needed) and run the main job: `hwaware pipeline` on the embedded digits data and this CPU.
# Extra args go to `hwaware pipeline` (e.g. --out DIR, --latency-ms X). Run again after an interruption: it continues.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hwaware pipeline "$@"
