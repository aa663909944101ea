#!/usr/bin/env bash
# The prepared GPU benchmark: one script, <= 8 min on one H200, nothing carried but this checkout (every model
# is built in code with random weights; no SmolLM2 file). Needs only torch and transformers on the box.
#   benchmarks/gpu.sh            # on the GPU: writes $OUT (default benchmarks/gpu-results) and prints Markdown
#   benchmarks/gpu.sh --dry      # the same steps at CPU sizes, in a minute (tests/test_benchmarks.py runs it)
# 1. plain SFT (a torch loop: loss.backward + torch.optim.AdamW) vs dpg.metagradients on a random GPT-2 small,
#    seq 128, T = 1 and 8: seconds, tokens/s, peak memory (benchmarks/metagrad_cost.py --peers);
# 2. one whole outer iteration through dpg/ alone: toy Llama generator, GPT-2-small-sized Llama target
#    (benchmarks/outer_iteration.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/gpu-results}"
mkdir -p "$OUT"
if [ "${1:-}" = "--dry" ]; then
  SFT=(--model tiny --seq 16 --microbatch 2 --grad-accum 2 --steps 1 2 --repeats 1 --device cpu --checkpoint host)
  ITER=(--dry --device cpu)
else
  # microbatch x accumulation: 64 sequences of 128 tokens per step (GPT-2 small fits many times over on an H200)
  SFT=(--model gpt2-small --seq 128 --microbatch "${MICROBATCH:-32}" --grad-accum "${GRAD_ACCUM:-2}" --steps 1 8
       --repeats 2 --checkpoint host)
  ITER=()
fi
{
  echo "# benchmarks/gpu.sh $* on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ)"
  "$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, " + (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no CUDA"))'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo
  echo "## plain SFT vs metagradient"
  "$PY" benchmarks/metagrad_cost.py --peers "${SFT[@]}" --json "$OUT/sft.json"
  echo
  echo "## one outer iteration"
  "$PY" benchmarks/outer_iteration.py "${ITER[@]}" --json "$OUT/iteration.json"
} 2>&1 | tee "$OUT/results.md"
