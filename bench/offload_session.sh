#!/usr/bin/env bash
# Issue 14's GPU session in one call: ZeRO-Offload / ZeRO-3 offload / NVMe offload of ds-zero beside the anchors
# (DeepSpeed ZeRO-2/3 + offload, FSDP2 + CPUOffloadPolicy, DeepSpeed ZeRO-Infinity), after the offload GPU tests
# (NO_TESTS=1 skips them). Model size from the environment as the anchor (the 3.94 B GPT:
# D=3072 LAYERS=32 HEADS=24 MB=4 STEPS=3).
#   D=3072 LAYERS=32 HEADS=24 MB=4 STEPS=3 NVME_PATH=/local/nvme bash bench/offload_session.sh ANCHOR_DIR
# Engines ($ENGINES): an anchor engine name (ds2off, ds3off, fsdp2off: ANCHOR_DIR/zero_anchor.py), ds3nvme /
# ds3nvmeparam (bench/ds_infinity_anchor.py), or zN@OFFLOAD for bench/zero_bench.py zN with OFFLOAD=1|opt|nvme.
# Logs go to $OUT; the bracketed result lines are collected in $OUT/results.txt.
set -o pipefail
ANCHORS=${1:?usage: offload_session.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
export NVME_PATH=${NVME_PATH:-/tmp/ds_nvme}
mkdir -p "$NVME_PATH"; df -h "$NVME_PATH" | tee "$OUT/nvme_df.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
if [ -z "${NO_TESTS:-}" ]; then
  timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning \
    tests/ds_zero/test_offload.py tests/ds_zero/test_stage3_offload_gpu.py > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|SKIPPED" "$OUT/gpu_tests.log" | tail -8
fi
for engine in ${ENGINES:-ds2off z2@1 ds3off z3@1 fsdp2off z3@opt z2@nvme ds3nvme}; do
  case $engine in
    z*@*) script=bench/zero_bench.py; arg=${engine%@*}; off=${engine#*@} ;;
    ds3nvme*) script=bench/ds_infinity_anchor.py; arg=$engine; off= ;;
    *) script="$ANCHORS/zero_anchor.py"; arg=$engine; off= ;;
  esac
  log="$OUT/${engine/@/_}.log"
  OFFLOAD=$off timeout "${RUN_TIMEOUT:-400}" torchrun --nproc_per_node "${NPROC:-1}" "$script" "$arg" > "$log" 2>&1
  echo "$engine rc=$?"; grep -E "^\[[^]]*\] (world=|DeepSpeed ZeRO-Infinity)" "$log" | tee -a "$OUT/results.txt"
  grep -E "Error|error:" "$log" | tail -3
done
rm -rf "$NVME_PATH"/ds_zero_swap "$NVME_PATH"/raw_bw_rank*.bin
