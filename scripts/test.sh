#!/usr/bin/env bash
# Set up (pip, local CPU torch wheel; apt for the cluster test's services) and run the whole offline test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
python scripts/local_cluster.py install  # PostgreSQL, Redis, the cluster extra (tests/test_cluster.py)
command -v chromedriver >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
  >/dev/null || echo "chromium not installed: tests/test_ui_browser.py will skip" >&2; }  # the UI test's browser
python -m pip install --quiet --disable-pip-version-check -c <(echo torch==2.13.0) -e ".[peer]"  # SAELens, TransformerLens
ruff check . && ruff format --check .  # lint and format ([tool.ruff] in pyproject.toml)
python -m mypy  # types on core/ ([tool.mypy])
export HF_HUB_OFFLINE=1
# two workers (one per CI core), each test module whole on one of them (its module fixtures built once)
exec python -m pytest -q -n 2 --dist loadfile "$@"
