#!/usr/bin/env bash
# Every GPU check and figure in one call on a lent GPU machine (docs/performance.md):
#   1. the CUDA tests (whole-step CUDA graphs, the streams ensemble),
#   2. the tuning table (benchmarks.gpu_variants: channels_last, the Echo noise in 1/2/4
#      pieces or one-shot, the ensemble strategies),
#   3. the benchmark suite with the settings fit uses on CUDA (whole-step CUDA graphs;
#      MODES="eager graph" adds the --no-cuda-graph run). sweep_overhead is CPU-only and needs Ray: not here.
# Usage (repo root, on the GPU machine): OUT=gpu_out ECHO_MNIST_DIR=.mnist bash benchmarks/gpu.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ECHO_MNIST_DIR=${ECHO_MNIST_DIR:-.mnist}
FIGURES=${FIGURES:-echo_vs_vae_step,epoch_overhead,images_per_s,ensemble_speedup,echo_noise_memory}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py \
    > "$OUT/tests.txt" 2>&1; tail -n 15 "$OUT/tests.txt"
timeout "${VARIANTS_TIMEOUT:-200}" python3 -m benchmarks.gpu_variants \
    > "$OUT/variants.txt" 2> "$OUT/variants.log"
echo "== variants (rc $?)"; grep -v "^{" "$OUT/variants.txt"; tail -n 3 "$OUT/variants.log"
for mode in ${MODES:-graph}; do
    flags=(); [ "$mode" = eager ] && flags=(--no-cuda-graph)
    timeout "${BENCH_TIMEOUT:-200}" python3 -m benchmarks --device cuda --only "$FIGURES" \
        "${flags[@]}" > "$OUT/$mode.txt" 2> "$OUT/$mode.log"
    echo "== $mode (rc $?)"; head -n -1 "$OUT/$mode.txt"; tail -n 3 "$OUT/$mode.log"
done
