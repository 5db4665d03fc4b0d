#!/usr/bin/env bash
# One device call that re-measures what a session changed, section by section ($SECTIONS, in order):
#   tests   the GPU tests of ds-moe, activation checkpointing, offload (overlap/ratio, stage-3 NVMe)
#   moe     ds-moe `bench/moe_bench.py all` beside the anchor's DeepSpeed MoE (top-2), same run
#   ckpt    bench/activation_ckpt_bench.py (every variant, cpu_checkpointing included)
#   pipe    bench/pipe_gpu_overhead.py (one-stage ds-pipe against the plain loop)
#   streamprobe  bench/offload_stream_probe.py (CPUAdam alone, the GPU stepping host state streamed, the splits)
#   limits  bench/host_limits.py (triad -> CPU Adam floor, pinned PCIe)
#   offload the 3.94 B GPT with CPU offload: DeepSpeed ZeRO-2 + offload, then ds-zero z2 + offload with the
#           overlapped step ($OFFLOAD_VARIANTS: sync, overlap, chunk, r75, auto40; eagerauto40 / eagermeasure40: the
#           eager step with ratio "auto" under a 40 GiB cap, planned from the default reserve / from the first
#           step's measured peak; eagermeasure40sNN / eagersNN: the same / the eager step at ratio 1, with NN % of
#           the CPU-held state streamed through the GPU (offload_optimizer.stream_ratio; TIMELINE=1 records the
#           former's per-chunk timeline, $OUT/timeline_<variant>.json); eagersmall: eager with 1e8 chunks and
#           2e8 buckets, timeline recorded; eagerbf16: eager with
#           offload_optimizer.state_dtype bf16 (opt-in 16-bit moments); spec: the default bf16 overflow check on
#           (with speculative_step on, opt-in), specclip: also gradient_clipping 1.0; specsmall / nospecsmall: spec
#           with 1e8 chunks, speculative_step on / off; eager: the chunks step during
#           backward, bf16 without the overflow check as DeepSpeed's; nocheck: the same config, eager_step off)
#   nvmeio  issue 14's NVMe swap: the O_DIRECT tests, then bench/nvme_swap_bench.py (raw disk bandwidth against
#           ds-zero's swap path, direct and buffered; $NVME_PATH, default /tmp/ds_nvme_bench; $NVME_GIB, default 8)
#   bash bench/gpu_day.sh ANCHOR_DIR        (logs and JSON under $OUT; results.txt collects the result lines)
set -o pipefail
ANCHORS=${1:?usage: gpu_day.sh ANCHOR_DIR}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
res() { tee -a "$OUT/results.txt"; }
# a carried DeepSpeed CPU Adam build (.torch_ext, from an earlier call's torch_ext.tgz, debug info stripped): newer
# than the sources just installed under /tmp/site, so ninja does not rebuild it (~200 s)
if [ -d "${TORCH_EXTENSIONS_DIR:-/nonexistent}/cpu_adam" ]; then
  touch "$TORCH_EXTENSIONS_DIR"/cpu_adam/*.o; sleep 1; touch "$TORCH_EXTENSIONS_DIR"/cpu_adam/*.so
fi
for section in ${SECTIONS:-tests moe ckpt pipe limits}; do
  start=$(date +%s)
  case $section in
    tests)
      timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning \
        ${TESTS:-tests/ds_moe/test_gpu.py tests/ds_train/test_activation_checkpointing.py tests/ds_zero/test_offload_overlap.py tests/ds_zero/test_stage3_nvme.py} \
        > "$OUT/gpu_tests.log" 2>&1
      echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8 ;;
    moe)
      timeout 120 torchrun --nproc_per_node 1 "$ANCHORS/moe_anchor.py" dsmoe > "$OUT/moe_anchor.log" 2>&1
      grep -E "^\[dsmoe\]" "$OUT/moe_anchor.log" | res
      timeout 240 torchrun --nproc_per_node 1 bench/moe_bench.py all --out "$OUT/moe_all.json" > "$OUT/moe_all.log" 2>&1
      echo "moe_bench rc=$?"; grep -E "^\[|floor|host syncs" "$OUT/moe_all.log" | res ;;
    moeq)  # quick: the anchor, then $MOE_MODES (default the floor, dropless, capacity), KEEP_CAST=0 dropless, profiled
      timeout "${MOE_TIMEOUT:-120}" torchrun --nproc_per_node 1 "$ANCHORS/moe_anchor.py" dsmoe > "$OUT/moe_anchor.log" 2>&1
      grep -E "^\[dsmoe\]" "$OUT/moe_anchor.log" | res
      for m in ${MOE_MODES:-dense_topk dropless capacity}; do
        timeout "${MOE_TIMEOUT:-120}" torchrun --nproc_per_node 1 bench/moe_bench.py "$m" --profile "$OUT/prof" > "$OUT/moe_$m.log" 2>&1
        echo "moe $m rc=$?"; grep -E "^\[" "$OUT/moe_$m.log" | res
      done
      if [ "${MOE_RECAST:-1}" != 0 ]; then  # MOE_RECAST=0: without the KEEP_CAST=0 dropless run
        KEEP_CAST=0 timeout "${MOE_TIMEOUT:-120}" torchrun --nproc_per_node 1 bench/moe_bench.py dropless > "$OUT/moe_recast.log" 2>&1
        grep -E "^\[" "$OUT/moe_recast.log" | sed "s/^/KEEP_CAST=0 /" | res
      fi ;;
    ckpt)
      timeout 240 python3 bench/activation_ckpt_bench.py --out "$OUT/activation_ckpt_h200.json" > "$OUT/ckpt.log" 2>&1
      echo "ckpt rc=$?"; tail -22 "$OUT/ckpt.log" | res ;;
    pipe)
      timeout 150 torchrun --nproc_per_node 1 bench/pipe_gpu_overhead.py > "$OUT/pipe.log" 2>&1
      echo "pipe rc=$?"; grep -E "^\[pipe|Error" "$OUT/pipe.log" | res ;;
    streamprobe)  # the host's two paths for an offloaded Adam element: CPUAdam, and the GPU with the state streamed
      timeout 150 python3 bench/offload_stream_probe.py --elements "${PROBE_ELEMENTS:-1e9}" > "$OUT/stream_probe.log" 2>&1
      echo "stream probe rc=$?"; grep -E "^split|^best|^host|Error" "$OUT/stream_probe.log" | res ;;
    limits)
      timeout 120 python3 bench/host_limits.py --out "$OUT/host_limits.json" > "$OUT/limits.log" 2>&1
      echo "limits rc=$?"; grep -E "^\[host|Error" "$OUT/limits.log" | res ;;
    nvmeio)
      timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
        tests/ds_zero/test_offload_nvme_direct.py > "$OUT/nvme_direct_tests.log" 2>&1
      echo "nvme direct tests rc=$?"; grep -E "passed|failed|skipped|FAILED|Error" "$OUT/nvme_direct_tests.log" | tail -4 | res
      timeout 150 python3 bench/nvme_swap_bench.py --path "${NVME_PATH:-/tmp/ds_nvme_bench}" --gib "${NVME_GIB:-8}" \
        --out "$OUT/nvme_swap.json" > "$OUT/nvme_swap.log" 2>&1
      echo "nvme_swap_bench rc=$?"; grep -E "^\[nvme|Error" "$OUT/nvme_swap.log" | res ;;
    offload)
      # the model's size for these runs only (an export would leak into the sections after: moeq ran out of memory)
      size=(D=${D:-3072} LAYERS=${LAYERS:-32} HEADS=${HEADS:-24} MB=${MB:-4} STEPS=${STEPS:-3})
      for v in ${OFFLOAD_VARIANTS:-ds2off overlap sync}; do
        case $v in
          ds2off) cmd=("$ANCHORS/zero_anchor.py" ds2off); envs=() ;;
          sync) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_OVERLAP=0) ;;
          overlap) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1) ;;
          eager) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0) ;;
          eagerauto40) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_CHUNK=1e8 OFFLOAD_RATIO=auto MEM_CAP_GIB=40) ;;
          eagermeasure40) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_CHUNK=1e8 OFFLOAD_RATIO=auto OFFLOAD_RESERVE=measure MEM_CAP_GIB=40) ;;
          eagermeasure40s[0-9]*)  # eagermeasure40s30: the same with 30 % of the CPU-held state streamed (stream_ratio 0.3)
            cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_CHUNK=1e8 OFFLOAD_RATIO=auto OFFLOAD_RESERVE=measure MEM_CAP_GIB=40 OFFLOAD_STREAM=0.${v#eagermeasure40s} ${TIMELINE:+DS_ZERO_OFFLOAD_TIMELINE=$OUT/timeline_$v.json}) ;;
          eagers[0-9]*)  # eagers30: the eager step at ratio 1 with 30 % of the state streamed
            cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_CHUNK=1e8 OFFLOAD_STREAM=0.${v#eagers}) ;;
          eagersmall) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_CHUNK=1e8 BUCKET=2e8 DS_ZERO_OFFLOAD_TIMELINE=$OUT/timeline_eager.json) ;;
          spec) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_SPECULATIVE=1) ;;
          specclip) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_SPECULATIVE=1 CLIP=1.0 DS_ZERO_OFFLOAD_TIMELINE=$OUT/timeline_specclip.json) ;;
          specsmall) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_CHUNK=1e8 OFFLOAD_SPECULATIVE=1) ;;
          nospecsmall) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_CHUNK=1e8) ;;
          eagerbf16) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_STATE_DTYPE=bf16) ;;
          nocheck) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 BF16_CHECK=0 OFFLOAD_EAGER=0) ;;
          chunk) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_CHUNK=1e8 DS_ZERO_OFFLOAD_TIMELINE=$OUT/timeline.json) ;;
          r75) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_CHUNK=1e8 OFFLOAD_RATIO=0.75) ;;
          auto40) cmd=(bench/zero_bench.py z2); envs=(OFFLOAD=1 OFFLOAD_CHUNK=1e8 OFFLOAD_RATIO=auto MEM_CAP_GIB=40) ;;
          *) echo "unknown offload variant $v"; continue ;;
        esac
        limit=${RUN_TIMEOUT:-240}; [ "$v" = ds2off ] && limit=${DS_TIMEOUT:-300}  # DeepSpeed builds its CPU Adam
        env "${size[@]}" "${envs[@]}" timeout "$limit" torchrun --nproc_per_node 1 "${cmd[@]}" > "$OUT/off_$v.log" 2>&1
        echo "offload $v rc=$?"; grep -E "^\[[^]]*\] world=|plan|ratio 'auto'|Error" "$OUT/off_$v.log" | tail -4 | sed "s/^/$v: /" | res
        # DeepSpeed's JIT-built CPU Adam, to carry into the next call (TORCH_EXTENSIONS_DIR=$PWD/.torch_ext)
        [ "$v" = ds2off ] && [ -d "${TORCH_EXTENSIONS_DIR:-/nonexistent}" ] && tar czf "$OUT/torch_ext.tgz" -C "$TORCH_EXTENSIONS_DIR" .
      done ;;
  esac
  echo "section $section: $(( $(date +%s) - start )) s"
done
