#!/usr/bin/env bash
# GPU check: runs the CUDA tests and the engine tests on the GPU machine, then the throughput
# benchmark on CUDA. Needs only torch, numpy, scikit-learn and pytest (no network, no install).
# Results go to $OUT (or ./gpu-results): gpu-tests.log, throughput.md, env.txt.
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
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -5
for n in 200000; do
  timeout 240 "$PY" benchmarks/throughput.py --device cuda --n "$n" --queries 32 --repeats 3 \
    --no-rss 2>&1 | tee -a "$OUT/throughput.md"
done
timeout 240 "$PY" benchmarks/models.py --device cuda --n 16384 --queries 8 2>&1 \
  | grep -v Warning | tee "$OUT/models.md"
