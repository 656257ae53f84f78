# Source me: project-local state for every command (no home-directory state needed).
WEIGHTLENS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export WEIGHTLENS_ROOT
export WEIGHTLENS_DATA_DIR="${WEIGHTLENS_DATA_DIR:-$WEIGHTLENS_ROOT/data}"
export DAGSTER_HOME="${DAGSTER_HOME:-$WEIGHTLENS_DATA_DIR/dagster_home}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$WEIGHTLENS_DATA_DIR/mplconfig}"
# The hub cache: yours if HF_HUB_CACHE is set, else a project-local one (the planted releases go here).
export HF_HUB_CACHE="${HF_HUB_CACHE:-$WEIGHTLENS_DATA_DIR/hf-cache}"
export HF_HUB_DISABLE_TELEMETRY=1
export PATH="$WEIGHTLENS_ROOT/.venv/bin:$PATH"
mkdir -p "$DAGSTER_HOME" "$MPLCONFIGDIR" "$HF_HUB_CACHE"
ln -sf "$WEIGHTLENS_ROOT/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
