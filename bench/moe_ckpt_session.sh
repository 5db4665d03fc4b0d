#!/usr/bin/env bash
# Issues 16 and 17's GPU session in one call: the GPU tests of ds-moe, activation checkpointing and the FLOPs
# profiler; then ds-moe beside ../shared/anchors/moe_anchor.py (top-2 / top-1 / 64 experts, same shapes), then the
# activation-checkpointing benchmark. Logs and JSON in $OUT.
#   bash bench/moe_ckpt_session.sh ANCHOR_DIR      (ANCHOR_DIR holds moe_anchor.py; .whl/ from prepare-wheels.sh)
set -o pipefail
ANCHORS=${1:?usage: moe_ckpt_session.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
if [ -z "${NO_TESTS:-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning tests/ds_moe \
    tests/ds_train/test_activation_checkpointing.py tests/ds_train/test_flops_profiler.py > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|SKIPPED|Error" "$OUT/gpu_tests.log" | tail -8
fi
anchor() {  # name, env assignments...
  local name=$1; shift
  env "$@" timeout 120 torchrun --nproc_per_node 1 "$ANCHORS/moe_anchor.py" dsmoe > "$OUT/anchor_$name.log" 2>&1
  echo "anchor $name rc=$?"; grep -vE "^\s*$|Warning|warn" "$OUT/anchor_$name.log" | tail -2 | sed "s/^/anchor $name: /" \
    | tee -a "$OUT/results.txt"
}
anchor top2
timeout 240 torchrun --nproc_per_node 1 bench/moe_bench.py all --out "$OUT/moe_all.json" > "$OUT/moe_all.log" 2>&1
echo "moe_bench all rc=$?"; grep -E "^\[|ratio|floor" "$OUT/moe_all.log" | tail -30 | tee -a "$OUT/results.txt"
anchor top1 K=1
anchor e64 E=64 LAYERS=2
anchor top2_again
timeout 200 python3 bench/activation_ckpt_bench.py --out "$OUT/activation_ckpt_h200.json" > "$OUT/act.log" 2>&1
echo "act ckpt rc=$?"; tail -12 "$OUT/act.log"
