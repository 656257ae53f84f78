#!/usr/bin/env bash
# Set up, generate the planted releases into their own cache, materialise the whole chain, start the UI.
#   bash scripts/demo.sh            (ends by serving the Dagster UI on http://127.0.0.1:3000)
#   bash scripts/demo.sh --no-ui    (stops after materialising)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export HF_HUB_OFFLINE=1   # the planted releases exist only on this machine
python -m core.testbeds.planted --cache-dir "$WEIGHTLENS_PLANTED_CACHE"
python -m orchestration.cli materialize
cat <<MSG

Results: $WEIGHTLENS_DATA_DIR/results.duckdb (DuckDB views over $WEIGHTLENS_DATA_DIR/tables/*/)
Planted releases: $WEIGHTLENS_PLANTED_CACHE (a hub cache of their own; your huggingface_hub cache is untouched)
Reports: $WEIGHTLENS_DATA_DIR/reports/<release>/report.md
Example query (the DuckDB CLI, or Python duckdb):
  .venv/bin/duckdb -readonly '$WEIGHTLENS_DATA_DIR/results.duckdb' -c "SELECT release, claim, verdict FROM claim_verdicts ORDER BY ALL"
  .venv/bin/python -c "import duckdb; print(duckdb.connect('$WEIGHTLENS_DATA_DIR/results.duckdb', read_only=True).sql(\"SELECT release, claim, verdict, round(value, 3) AS features, round(control_value, 3) AS control FROM claim_verdicts ORDER BY ALL\"))"
MSG
if [ "${1:-}" != "--no-ui" ]; then
  echo "Dagster UI: http://127.0.0.1:3000  (Ctrl-C to stop)"
  exec dagster dev -h 127.0.0.1 -p 3000
fi
