# Source me: project-local state for every command (no home-directory state needed).
WEIGHTLENS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export WEIGHTLENS_ROOT
export WEIGHTLENS_DATA_DIR="${WEIGHTLENS_DATA_DIR:-$WEIGHTLENS_ROOT/data}"
export DAGSTER_HOME="${DAGSTER_HOME:-$WEIGHTLENS_DATA_DIR/dagster_home}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$WEIGHTLENS_DATA_DIR/mplconfig}"
# The hub cache is huggingface_hub's own (HF_HUB_CACHE if you set it, else $HF_HOME/hub, else
# ~/.cache/huggingface/hub), so models you already have are not downloaded again. The planted releases,
# which exist on no hub, live in a cache of their own, read only for them (orchestration.resources.HubResource).
export WEIGHTLENS_PLANTED_CACHE="${WEIGHTLENS_PLANTED_CACHE:-$WEIGHTLENS_DATA_DIR/planted-hub}"
export HF_HUB_DISABLE_TELEMETRY=1
export PATH="$WEIGHTLENS_ROOT/.venv/bin:$PATH"
mkdir -p "$DAGSTER_HOME" "$MPLCONFIGDIR" "$WEIGHTLENS_PLANTED_CACHE"
ln -sf "$WEIGHTLENS_ROOT/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
