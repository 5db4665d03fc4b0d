#!/usr/bin/env bash
# Issue 11's GPU session in one call: the GPU tests of stage 3 (and ds-optim's DTensor path), then ds-zero
# stage 3 interleaved with the anchors (FSDP2, DeepSpeed ZeRO-3), the GPT of ../shared/TARGETS.md in bf16.
#   bash bench/zero3_session.sh ANCHOR_DIR     (ANCHOR_DIR holds zero_anchor.py; .whl/ filled by
#                                              ../shared/device/prepare-wheels.sh)
# One GPU (world size 1): the engines' own cost and memory. ENGINES overrides the list; "z3init" builds the
# model under ds_zero.Init, "z3fp32" reduces gradients in fp32 as the FSDP2 anchor does, "z3reuse0" sets
# stage3_max_reuse_distance 0; TESTS overrides the GPU test files. Logs in $OUT.
set -o pipefail
ANCHORS=${1:?usage: zero3_session.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NPROC=${NPROC:-1}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpus.txt"
if [ -z "${NO_TESTS:-}" ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    ${TESTS:-tests/ds_zero/test_gpu_stage3.py tests/ds_optim/test_dtensor.py} > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|SKIPPED|Error" "$OUT/gpu_tests.log" | tail -8
fi
for engine in ${ENGINES:-fsdp2 z3 ds3 z3init z3fp32 fsdp2 z3}; do
  case $engine in
    z3init) script=bench/zero_bench.py; arg=z3; export INIT=1 ;;
    z3fp32) script=bench/zero_bench.py; arg=z3; export COMM_DTYPE=fp32 ;;
    z3reuse0) script=bench/zero_bench.py; arg=z3; export REUSE=0 ;;
    z*) script=bench/zero_bench.py; arg=$engine ;;
    *) script="$ANCHORS/zero_anchor.py"; arg=$engine ;;
  esac
  timeout "${RUN_TIMEOUT:-150}" torchrun --nproc_per_node "$NPROC" "$script" "$arg" > "$OUT/$engine.log" 2>&1
  echo "$engine rc=$?"; grep -E "^\[[^]]*\] world=" "$OUT/$engine.log" | sed "s/^/$engine /" | tee -a "$OUT/results.txt"
  grep -E "Error|error:" "$OUT/$engine.log" | tail -3
  unset INIT COMM_DTYPE REUSE
done
