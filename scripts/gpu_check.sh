#!/usr/bin/env bash
# The GPU check of issue 18 (the Triton step of LO / MuLO / Celo): CUDA tests, then the step
# benchmark, then the end-to-end benchmark, then (issue 15) the sharded FSDP2 step through the
# Triton phases and its benchmark. One script for a session that has a GPU.
#
#   bash scripts/gpu_check.sh [WHEELS_DIR]
#   STAGES="4" bash scripts/gpu_check.sh       # only the sharded step
#
# Run from the repository root. Results (JSON and logs) go to $OUT if set, else to
# benchmarks/results/. If mup, jsonargparse, docstring-parser or typeshed-client are missing (the
# device machine has torch, lightning and triton only), they are installed from WHEELS_DIR, made
# beforehand on a machine with the package index:
#
#   pip download --no-deps mup jsonargparse docstring-parser typeshed-client -d shared/wheels
#
# Each stage has its own time limit (STAGE_LIMIT_S, default 170 s) so that a slow stage leaves the
# others their time; the end-to-end benchmark writes its JSON after each case. Three stages fit in
# one 600 s command: run STAGES="1 2 3", then STAGES="4" (default: all four).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-shared/wheels}"
RESULTS="${OUT:-benchmarks/results}"
LIMIT="${STAGE_LIMIT_S:-170}"
STAGES="${STAGES:-1 2 3 4}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY' || pip install --no-index --find-links "$WHEELS" mup jsonargparse docstring-parser typeshed-client
import importlib, sys
missing = [m for m in ("mup", "jsonargparse", "docstring_parser", "typeshed_client") if importlib.util.find_spec(m) is None]
print("missing:", missing or "none")
sys.exit(1 if missing else 0)
PY
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check.sh: no CUDA device here" >&2; exit 2; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$RESULTS/gpu_check-versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$RESULTS/gpu_check-versions.txt" 2>&1

status=0
stage() { [[ " $STAGES " == *" $1 "* ]]; }

stage 1 && {
echo "== 1/4 CUDA tests (the GPU step, exact and fast numerics, CUDA graph capture, the chunked pure step)"
timeout "$LIMIT" python -m pytest tests/optim/test_gpu_step.py tests/optim/test_functional_chunked.py -q -rs \
  --junitxml="$RESULTS/gpu_check-tests.xml" 2>&1 | tee "$RESULTS/gpu_check-tests.log" || status=1
}

stage 2 && {
echo "== 2/4 optimizer step: GPT-2 124M / 355M / 1.3B, ViT-B/16, many small tensors, particles"
timeout "$LIMIT" python -m benchmarks.bench_optimizer_step --device cuda --out "$RESULTS" \
  --cases gpt2-124m gpt2-355m gpt2-1.3b vit-b16 many-small \
  --optimizers adamw-fused mulo lo celo mulo-exact mulo-bf16 2>&1 \
  | tee "$RESULTS/gpu_check-step.log" || status=1
}

stage 3 && {
echo "== 3/4 end to end: μP LM (width 1024, depth 3, 2000 steps) and ViT-B/16 (batch 32, bf16-mixed)"
timeout "$LIMIT" python -m benchmarks.bench_end_to_end --device cuda --out "$RESULTS" 2>&1 \
  | tee "$RESULTS/gpu_check-end_to_end.log" || status=1
}

stage 4 && {
# One rank per GPU (NCCL); on a one-GPU machine one rank, whose all-reduces still go through NCCL.
# The multi-rank numerics (uneven and empty shards) are tested on CPU under Triton's interpreter.
echo "== 4/4 sharded step (FSDP2): the Triton phases through NCCL, one rank per GPU; its benchmark"
RANKS=$(python -c "import torch; print(min(torch.cuda.device_count(), 3))")
timeout "$LIMIT" python -m pytest tests/optim/test_sharded.py tests/optim/test_gpu_step.py -q -rs \
  -k "cuda_takes_the_gpu_phases or phases_on_blocks" --junitxml="$RESULTS/gpu_check-sharded-tests.xml" 2>&1 \
  | tee "$RESULTS/gpu_check-sharded-tests.log" || status=1
timeout "$LIMIT" python benchmarks/bench_sharded_step.py --device cuda --world "$RANKS" --width 4096 --repeats 20 \
  --out "$RESULTS/sharded_step-cuda.json" 2>&1 | tee "$RESULTS/gpu_check-sharded-step.log" || status=1
}

exit $status
