#!/bin/bash
# Issue 17's GPU table in one go, on a machine with torch + CUDA only (docs/gpu.md):
#   bash benchmarks/gpu_table.sh [OUT_DIR] [WHEEL_DIR]
# then: python -m benchmarks.gpu_table OUT_DIR   (merges into benchmarks/results/parallel_envs_gpu.json)
# Each step has its own time limit (override T0..T4, in seconds); every PPO run saves its JSON after
# each row, so a step cut short keeps what it measured. About 8 minutes on one H100.
OUT=${1:-benchmarks/results/gpu_run}
WHEELS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SDL_VIDEODRIVER=dummy
if [ -n "$WHEELS" ]; then  # gymnasium, pydantic, ... (cp312), see docs/gpu.md
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nproc; date -u; } 2>&1 | tee "$OUT/env.txt"
B="python3 -m benchmarks.parallel_envs --device cuda --size base --image-size 224"
step() { echo "=== $(date -u +%T) $*"; }
{
step pytest; timeout "${T0:-60}" python3 -m pytest -q -x -p no:cacheprovider --timeout 55 -m gpu tests/unit/test_device_collector.py 2>&1 | tail -30
step full8; timeout "${T1:-150}" $B --train full --envs 8 --updates 3 --latency 1 8 16 --out "$OUT/ppo_full_n8.json" 2>&1 | grep -v Warn
step frozen16; timeout "${T2:-90}" $B --train frozen --envs 16 --updates 4 --out "$OUT/ppo_frozen_n16.json" 2>&1 | grep -v Warn
step sac8; timeout "${T3:-70}" $B --algo sac --envs 8 --sac-settings heads_b256_utd025 --seconds 15 --out "$OUT/sac_n8.json" 2>&1 | grep -v Warn
step full4; timeout "${T4:-110}" $B --train full --envs 4 --updates 2 --out "$OUT/ppo_full_n4.json" 2>&1 | grep -v Warn
step done
} 2>&1 | tee "$OUT/run.log"
