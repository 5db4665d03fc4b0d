#!/usr/bin/env bash
# One GPU-machine session (2 GPUs) for ds-optim and the compressed optimizers: kernel checks, GPU tests, the
# optimizer benchmark, cold start and the 2-GPU DDP swap example. Logs and JSON go to $OUT.
#   bash bench/gpu_session.sh        (after ../shared/device/prepare-wheels.sh filled .whl/)
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | paste -sd:):$PYTHONPATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
timeout 150 python3 tests/ds_optim/gpu_kernel_check.py > "$OUT/kernel_check.log" 2>&1
echo "kernel check rc=$? PASS=$(grep -c PASS "$OUT/kernel_check.log") FAIL=$(grep -c FAIL "$OUT/kernel_check.log")"
grep FAIL "$OUT/kernel_check.log" | head -20
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/ds_optim/test_kernel_conformance.py tests/ds_comm/test_onebit_adam.py -m "gpu or not gpu" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED" "$OUT/gpu_tests.log" | head -15
timeout 240 python3 bench/optim_bench.py --rounds 3 --iters 5 --out "$OUT/optim.json" > "$OUT/optim.log" 2>&1
echo "bench rc=$?"; grep -v -i warn "$OUT/optim.log" | tail -45
timeout 60 python3 bench/optim_coldstart.py --device cuda --out "$OUT/coldstart.json" 2>&1 | tail -3
for o in torch ds-optim; do
  timeout 60 torchrun --nproc_per_node 2 examples/ddp_swap_optimizer.py --optimizer $o --steps 200 --log-every 100 \
    --out "$OUT/swap_$o.json" 2>&1 | grep -E "step +200|Error"
done
