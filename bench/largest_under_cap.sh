#!/usr/bin/env bash
# The largest GPT each engine trains with CPU offload under a GPU memory cap (issue 14: MEM_CAP_GIB=24, a consumer
# GPU): DeepSpeed ZeRO-3 + offload (the anchor's ds3off; ds3offinit: its model built under deepspeed.zero.Init)
# against ds-zero stage 3 + offload (zero_bench z3, OFFLOAD=1), and optionally ds-zero stage 2 + offload (z2@1). Each engine climbs a ladder of sizes (params ~ 12 L D^2
# plus the embeddings) and stops at its first failure; a size "trains" when STEPS steps finish (rc 0 and a result
# line). What stops a climb is printed: the GPU cap (CUDA OOM), the host (killed: rc 137, 128 GiB here holds ~16-18
# bytes per param of offloaded state), or the time limit (rc 124, the size is then unknown, not failed).
#   ENGINES="ds3off z3@1" LADDER="3072x32 4096x32 4096x40 4608x40 5120x40" MEM_CAP_GIB=24 MB=1 \
#     bash bench/largest_under_cap.sh ANCHOR_DIR        (results in $OUT/largest.txt)
set -o pipefail
ANCHORS=${1:?usage: largest_under_cap.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
if [ -d "${TORCH_EXTENSIONS_DIR:-/nonexistent}/cpu_adam" ]; then  # a carried DeepSpeed CPU Adam (see gpu_day.sh)
  touch "$TORCH_EXTENSIONS_DIR"/cpu_adam/*.o; sleep 1; touch "$TORCH_EXTENSIONS_DIR"/cpu_adam/*.so
fi
cap=${MEM_CAP_GIB:-24}
for engine in ${ENGINES:-ds3off z3@1}; do
  case $engine in
    # INIT=1: ds_zero.Init, the model built on the meta device and materialised shard by shard (DeepSpeed's
    # zero.Init in the anchor): built whole on the GPU first, a 6.6 B GPT's fp32 weights alone pass a 24 GiB cap
    z*@*) script=bench/zero_bench.py; arg=${engine%@*}; off=${engine#*@}; init=1 ;;
    # DeepSpeed ZeRO-3 + offload with the anchor's model built under deepspeed.zero.Init (bench/ds3_init_anchor.py)
    ds3offinit) script=bench/ds3_init_anchor.py; arg=; off=; init= ;;
    *) script="$ANCHORS/zero_anchor.py"; arg=$engine; off=; init= ;;
  esac
  best=none
  for size in ${LADDER:-3072x32 4096x32 4096x40 4608x40 5120x40}; do
    d=${size%x*}; layers=${size#*x}
    log="$OUT/largest_${engine/@/_}_${size}.log"
    env D="$d" LAYERS="$layers" HEADS=$(( d / 128 )) MB="${MB:-1}" STEPS="${STEPS:-2}" MEM_CAP_GIB="$cap" OFFLOAD="$off" INIT="$init" \
      ANCHOR_DIR="$ANCHORS" timeout "${RUN_TIMEOUT:-300}" torchrun --nproc_per_node 1 "$script" ${arg:+"$arg"} > "$log" 2>&1
    rc=$?
    line=$(grep -E "^\[[^]]*\] world=" "$log" | tail -1)
    if [ $rc -eq 0 ] && [ -n "$line" ]; then
      best=$size; echo "$engine $size trains: $line" | tee -a "$OUT/largest.txt"; continue
    fi
    why="rc=$rc"
    grep -q "OutOfMemoryError\|CUDA out of memory" "$log" && why="GPU cap ($cap GiB): CUDA out of memory"
    # killed by the kernel (the OOM killer: host memory): rc 137 from the script itself, rc 1 from torchrun
    { [ $rc -eq 137 ] || grep -q "Signal 9 (SIGKILL)" "$log"; } && why="killed (SIGKILL: host memory)"
    [ $rc -eq 124 ] && why="time limit ${RUN_TIMEOUT:-300} s (size unknown)"
    echo "$engine $size stops: $why" | tee -a "$OUT/largest.txt"
    break
  done
  echo "$engine largest under $cap GiB: $best" | tee -a "$OUT/largest.txt"
done
