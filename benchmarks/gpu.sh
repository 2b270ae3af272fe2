#!/usr/bin/env bash
# GPU check: runs the CUDA tests and the engine tests on the GPU machine, then the throughput
# benchmark on CUDA. Needs only torch, numpy, scikit-learn and pytest (no network, no install).
# Results go to $OUT (or ./gpu-results): gpu-tests.log, throughput.md, models.md, env.txt.
# Total under about 7 minutes (each step has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -5
for n in 200000; do
  timeout 60 "$PY" benchmarks/throughput.py --device cuda --n "$n" --queries 32 --repeats 3 \
    --no-rss 2>&1 | tee -a "$OUT/throughput.md"
done
# fp32, bf16 autocast and torch.compile, one model at a time (rows appear as they finish)
for model in cnn transformer; do
  timeout 120 "$PY" benchmarks/models.py --device cuda --model "$model" --n 16384 --queries 8 \
    --variants fp32,bf16,compile 2>&1 | grep -v Warning | tee -a "$OUT/models.md"
done
