#!/usr/bin/env bash
# Issue 5's GPU session in one call: the GPT of ../shared/TARGETS.md (bf16) trained by ds-zero stages 0/1/2
# interleaved with the anchors (DDP, DeepSpeed ZeRO-1/2, FSDP2) so drift hits both alike, after the GPU tests
# (NO_TESTS=1 skips them).
#   NPROC=2 bash bench/zero_session.sh ANCHOR_DIR     (ANCHOR_DIR holds zero_anchor.py; .whl/ filled by
#                                                      ../shared/device/prepare-wheels.sh)
# NPROC=1 measures the engines' own cost (no communication) where only one GPU is lent. Logs go to $OUT; the
# bracketed result lines (one per engine) are also collected in $OUT/results.txt.
set -o pipefail
ANCHORS=${1:?usage: zero_session.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NPROC=${NPROC:-2}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
if [ -z "${NO_TESTS:-}" ]; then
  timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning \
    tests/ds_zero/test_gpu.py tests/ds_launch/test_launch_gpu.py > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|SKIPPED" "$OUT/gpu_tests.log" | tail -8
fi
for engine in ${ENGINES:-ddp z0 ds1 z1 ds2 z2 fsdp2}; do
  case $engine in z*) script=bench/zero_bench.py ;; *) script="$ANCHORS/zero_anchor.py" ;; esac
  timeout "${RUN_TIMEOUT:-150}" torchrun --nproc_per_node "$NPROC" "$script" "$engine" > "$OUT/$engine.log" 2>&1
  echo "$engine rc=$?"; grep -E "^\[[^]]*\] world=" "$OUT/$engine.log" | tee -a "$OUT/results.txt"
  grep -E "Error|error:" "$OUT/$engine.log" | tail -3
done
