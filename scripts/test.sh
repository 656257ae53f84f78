#!/usr/bin/env bash
# Set up (pip, local CPU torch wheel) and run the whole offline test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
