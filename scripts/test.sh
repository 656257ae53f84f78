#!/usr/bin/env bash
# Set up (pip, local CPU torch wheel; apt for the cluster test's services) and run the whole offline test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
python scripts/local_cluster.py install  # PostgreSQL, Redis, the cluster extra (tests/test_cluster.py)
export HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
