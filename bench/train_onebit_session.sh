#!/usr/bin/env bash
# Issue 4's end-to-end benchmark on a 2-GPU machine, in one session: the GPT of ../shared/TARGETS.md trained with
# DDP + torch AdamW, DDP + ds-comm OnebitAdam, and DeepSpeed 0.19.6 OneBitAdam (the anchor script), on the socket
# transport (commodity-Ethernet emulation) and on NVLink. Logs and JSON go to $OUT.
#   bash bench/train_onebit_session.sh ANCHOR_DIR      (ANCHOR_DIR holds zero_anchor.py; .whl/ filled by
#                                                       ../shared/device/prepare-wheels.sh)
set -o pipefail
ANCHORS=${1:?usage: train_onebit_session.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
STEPS=${STEPS:-10}
for link in ${LINKS:-socket nvlink}; do
  if [ $link = socket ]; then export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1;
  else unset NCCL_P2P_DISABLE NCCL_SHM_DISABLE NCCL_IB_DISABLE; fi
  for c in ddp-onebit ddp-adamw; do
    timeout 240 torchrun --nproc_per_node 2 bench/train_onebit_bench.py $c --steps "$STEPS" --label $link \
      --out "$OUT/$link-$c.json" > "$OUT/$link-$c.log" 2>&1
    echo "$link $c rc=$?"; grep -E "^\[|Error" "$OUT/$link-$c.log" | tail -3
  done
  STEPS=$STEPS timeout 300 torchrun --nproc_per_node 2 "$ANCHORS/zero_anchor.py" ds0onebit > "$OUT/$link-ds-onebit.log" 2>&1
  echo "$link ds-onebit rc=$?"; grep -E "^\[|Error" "$OUT/$link-ds-onebit.log" | tail -3
done
