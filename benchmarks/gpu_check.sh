#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, in under 8 minutes,
#   1. the engine benchmark on cuda (every statistic, fp32 and bf16) against the CUDA matmul floor and the
#      naive approach (Gemma-2-2B logit-lens shapes, 4096 features);
#   2. the fidelity tests (engine, lenses and circuits against transformers' modules) with the engine and
#      the circuits on cuda (WEIGHTLENS_TEST_DEVICE=cuda);
#   3. the asset chain on one planted partition with --device cuda, compared table by table with the same
#      partition computed on the CPU;
# then one summary table. `--cpu` is the dry mode CI runs (tests/test_gpu_check.py) so that it cannot rot: the
# same steps on the CPU at toy sizes, the fidelity tests collected but not run (the suite runs them anyway).
#
#   bash benchmarks/gpu_check.sh [--cpu] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda features=4096 vocab=256000 repeats=2 collect="" nulls=512 out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) device=cpu features=64 vocab=8192 repeats=1 collect=--collect-only nulls=64; shift ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--cpu] [--out DIR]" >&2; exit 2 ;;
  esac
done
out="${out:-$(mktemp -d)}"
mkdir -p "$out"
[[ -x .venv/bin/python ]] || bash scripts/setup.sh
source scripts/env.sh
export HF_HUB_OFFLINE=1
if [[ "$device" == cuda ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: CUDA is not available here (torch $(python -c 'import torch; print(torch.__version__)')); use --cpu" >&2
  exit 2
fi
python -c "import torch; print('torch', torch.__version__, 'device', '$device',
  torch.cuda.get_device_name(0) if '$device' == 'cuda' else '')" | tee "$out/device.txt"

step() { local name="$1"; shift; local t0=$SECONDS; if "$@" > "$out/$name.log" 2>&1; then
  echo "$name ok $((SECONDS - t0))" >> "$out/steps.txt"; else
  echo "$name FAILED $((SECONDS - t0))" >> "$out/steps.txt"; tail -30 "$out/$name.log"; fi; }
: > "$out/steps.txt"

step engine python benchmarks/engine_benchmark.py --device "$device" --n-features "$features" --vocab "$vocab" \
  --repeats "$repeats" --json "$out/engine.json"
WEIGHTLENS_TEST_DEVICE="$device" step fidelity python -m pytest -q -p no:cacheprovider $collect \
  tests/test_engine.py tests/test_fidelity.py tests/test_circuits_fidelity.py tests/test_gemma3_fidelity.py
step chain python benchmarks/device_chain.py --device "$device" --null-directions "$nulls" --out "$out/chain"

echo
echo "== summary ($(cat "$out/device.txt")) =="
cat "$out/engine.log" | sed -n '2,$p'
grep -E "passed|failed|collected" "$out/fidelity.log" | tail -1 | sed 's/^/fidelity: /'
sed 's/^/chain: /' "$out/chain.log"
echo "steps (name, status, seconds):"
cat "$out/steps.txt"
! grep -q FAILED "$out/steps.txt"
