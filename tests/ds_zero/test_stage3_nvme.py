"""NVMe offload of the optimizer at ZeRO stage 3 (``offload_optimizer: {device: nvme}``, ``ds_zero._swap_stage3``).

FSDP2's CPU offload keeps the fp32 shards (the masters) in host memory; Adam's moments live in swap files and are
stepped sub-group by sub-group with CPUAdam's kernel, so on 2 gloo ranks the run must equal stage-3 CPU offload
*bit for bit* -- every full param and both full Adam states (sharded weights and the persistent biases' masters)
-- with accumulation, clipping that fires, bf16 and fp32, and a ``sub_group_size`` small enough that every
group takes several sub-groups (the next one's read overlapping the current one's step). Checkpoints: an NVMe run
resumes bit for bit, and its checkpoint loads into stage-3 CPU offload (bit for bit: the same kernel) and into no
offload (torch AdamW: fp32 round-off). The swap files exist during the run (moments only: two files per group),
the moments are file mappings counted under ``nvme`` by ``model_state_bytes()``, and the directory is gone with
the engine. Faults: a bad ``nvme_path`` on one rank fails on every rank naming it; a write failing mid-step on one
rank is raised on every rank (none hangs in the next all-gather); a non-Adam optimizer is refused by name.

GPU (NCCL, pinned FSDP2 shards, 1 GPU): ``python -m pytest -q -m gpu tests/ds_zero/test_stage3_nvme.py``.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
from harness import requires_gpus, run_distributed
from pydantic import ValidationError
from zero_cases import base_config, full_state, make_model, micro_batch, param_groups

import ds_zero
from ds_zero import EngineConfig
from ds_zero._swap import NVMeSwapError

Z3 = {"param_persistence_threshold": 30, "shard_units": ["Linear"]}  # biases persistent, weights sharded
STEPS, GA, CLIP, SUB = 3, 2, 0.05, 50


def _nvme(path):
    return {"offload_optimizer": {"device": "nvme", "nvme_path": str(path)}, "sub_group_size": SUB}


CPU = {"offload_optimizer": {"device": "cpu"}, "sub_group_size": SUB}


# -- config --------------------------------------------------------------------------------------------------
def test_stage3_nvme_config_and_param_nvme_path():
    cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 3, **_nvme("/tmp"),
                                                             "offload_param": {"device": "cpu"}}})
    assert cfg.zero_optimization.offload_optimizer.device == "nvme"
    # parameter NVMe offload is built (test_stage3_param_nvme); it needs its own nvme_path
    with pytest.raises(ValidationError, match="offload_param.device = 'nvme' needs offload_param.nvme_path"):
        EngineConfig.model_validate({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})


# -- 2 ranks ---------------------------------------------------------------------------------------------------
def _engine(zero, dtype=None, model=None, opt=None, sched=False):
    model = model if model is not None else make_model()
    extra = {"zero": {**Z3, **zero}, "gradient_clipping": CLIP}
    if dtype:
        extra[dtype] = {"enabled": True, "auto_cast": True}
    optimizer = opt(model) if opt else torch.optim.AdamW(param_groups(model), lr=1e-2)
    scheduler = (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)) if sched else None
    return ds_zero.ZeroEngine(model, optimizer, base_config(3, 1, GA, **extra), lr_scheduler=scheduler)


def _states(engine):
    """Both full Adam states of every param the optimizer steps, in its order (sharded ones gathered)."""
    out = []
    for group in engine.optimizer.param_groups:
        for p in group["params"]:
            st = engine.optimizer.state[p]
            out.append([float(st["step"])] + [st[k].full_tensor().clone() for k in ("exp_avg", "exp_avg_sq")])
    return out


def _train(engine, steps, first=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for step in range(first, first + steps):
        for micro in range(GA):
            x, y = micro_batch(step, micro, rank, world, 1, GA)
            engine.backward(engine(x, y))
            engine.step()
        out.append({"params": full_state(engine.module), "states": _states(engine), "norm": engine.global_grad_norm})
    return out


def _same(a, b):
    return len(a) == len(b) and all(
        sa["params"].keys() == sb["params"].keys() and all(torch.equal(v, sb["params"][k]) for k, v in sa["params"].items())
        and len(sa["states"]) == len(sb["states"]) and all(
            x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(sa["states"], sb["states"]))
        for sa, sb in zip(a, b))


def _close(a, b):
    for sa, sb in zip(a, b):
        for k, v in sb["params"].items():
            torch.testing.assert_close(sa["params"][k], v, rtol=1e-2, atol=2e-3)


def _fail_write(*args, **kwargs):
    raise NVMeSwapError("NVMe swap write of 'group0.exp_avg' at element 0 failed (the disk under nvme_path is full)")


def _scenarios(tmp):
    rank = dist.get_rank()
    path = os.path.join(tmp, f"nvme{rank}")  # one directory per rank, as on one disk per node
    os.makedirs(path, exist_ok=True)
    swap = os.path.join(path, "ds_zero_swap", f"rank{rank}")
    out = {}
    for dtype in (None, "bf16"):
        cpu = _train(_engine(CPU, dtype), STEPS)
        eng = _engine(_nvme(path), dtype)
        nvme = _train(eng, STEPS)
        out[dtype] = {"same": _same(nvme, cpu), "clipped": all(s["norm"] > CLIP for s in nvme),
                      "moved": not torch.equal(nvme[-1]["params"]["fc2.weight"], full_state(make_model())["fc2.weight"])}
        if dtype == "bf16":
            opt = eng.optimizer
            out["evidence"] = {
                "optimizer": type(opt).__name__, "swap_steps": opt.swap_steps, "files": sorted(os.listdir(swap)),
                "sub_groups": [-(-n // opt.sub_group_size) for n in opt.sizes],
                "mapped": sorted({opt.state[p][k]._local_tensor.untyped_storage().filename or ""
                                  for p in opt.slots for k in ("exp_avg", "exp_avg_sq")}),
                "shards_on_cpu": all(p._local_tensor.device.type == "cpu" for p in eng.policy.sharded),
                "bytes": eng.model_state_bytes(), "swap_bytes": opt.last_swap_bytes}
            del opt
        del eng
        gc.collect()
        if dtype == "bf16":
            out["files_after"] = os.path.exists(swap)
    # resume: 2 steps, save, 1 more; fresh engines (other seeds) load and take the same step
    ckpt = os.path.join(tmp, "ckpt")
    whole = _engine(_nvme(path), "bf16", sched=True)
    _train(whole, 2)
    whole.save_checkpoint(ckpt, tag="t")
    tail = _train(whole, 1, first=2)
    del whole
    gc.collect()
    again = _engine(_nvme(path), "bf16", model=make_model(seed=5), sched=True)
    again.load_checkpoint(ckpt, tag="t")
    out["resume_nvme"] = _same(_train(again, 1, first=2), tail)
    del again
    gc.collect()
    cpu = _engine(CPU, "bf16", model=make_model(seed=6), sched=True)
    cpu.load_checkpoint(ckpt, tag="t")
    cpu_tail = _train(cpu, 1, first=2)
    out["resume_cpu"] = _same(cpu_tail, tail)
    # and back: the CPU-offload checkpoint into an NVMe run
    cpu.save_checkpoint(ckpt, tag="c")
    cpu_next = _train(cpu, 1, first=3)
    back = _engine(_nvme(path), "bf16", model=make_model(seed=7), sched=True)
    back.load_checkpoint(ckpt, tag="c")
    out["resume_back"] = _same(_train(back, 1, first=3), cpu_next)
    del back
    gc.collect()
    plain = _engine({}, "bf16", model=make_model(seed=8), sched=True)
    plain.load_checkpoint(ckpt, tag="t")
    out["resume_plain"] = _train(plain, 1, first=2)
    out["tail"] = tail
    # a write failing mid-step on rank 1 only: an error on both ranks, nobody hangs
    eng = _engine(_nvme(path))
    if rank == 1:
        eng.optimizer.files.write = _fail_write
    try:
        _train(eng, 1)
        out["fault"] = None
    except NVMeSwapError as exc:
        out["fault"] = str(exc)
    del eng
    gc.collect()
    # two live engines on one directory (``engine = build()`` again): their own files, neither removes the other's
    first = _engine(_nvme(path))
    second = _engine(_nvme(path))
    out["twice_files"] = sorted(os.listdir(swap))
    del first
    gc.collect()
    out["twice_left"] = sorted(os.listdir(swap))
    _train(second, 1)
    del second
    gc.collect()
    out["twice_after"] = os.path.exists(swap)
    try:
        _engine(_nvme(path), opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
        out["sgd"] = None
    except ValueError as exc:
        out["sgd"] = str(exc)
    return out


def test_stage3_nvme_equals_cpu_offload_bit_for_bit_and_resumes(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("z3nvme"))
    results = run_distributed(_scenarios, 2, tmp, timeout=300)
    for rank, r in enumerate(results):
        for dtype in (None, "bf16"):
            assert r[dtype]["same"] and r[dtype]["clipped"] and r[dtype]["moved"], (rank, dtype)
        ev = r["evidence"]
        assert ev["optimizer"] == "NVMeShardAdam" and ev["swap_steps"] == STEPS and ev["shards_on_cpu"]
        assert min(ev["sub_groups"]) >= 2 and max(ev["sub_groups"]) >= 3
        # moments only: the masters are FSDP2's host shards
        assert ev["files"] == sorted(["owner"] + [f"group{g}.{k}" for g in (0, 1) for k in ("exp_avg", "exp_avg_sq")])
        assert all("ds_zero_swap" in name for name in ev["mapped"])
        b = ev["bytes"]
        assert b["nvme"] == b["optimizer_states"] > 0 and b["host"] >= b["master_params"] > 0
        assert b["offload_buffers"] == 2 * 2 * 4 * SUB and b["nvme"] + b["host"] + b["device"] == b["total"]
        assert ev["swap_bytes"] > 0
        assert r["files_after"] is False  # removed with the engine
        assert r["resume_nvme"] and r["resume_cpu"] and r["resume_back"], rank
        _close(r["resume_plain"], r["tail"])  # torch AdamW from the same state: fp32 round-off, bf16 rounding
        assert "SGD" in r["sgd"] and "Adam/AdamW only" in r["sgd"]
        moments = [f"group{g}.{k}" for g in (0, 1) for k in ("exp_avg", "exp_avg_sq")]
        second = [n for n in r["twice_left"] if n != "owner"]
        assert len(second) == 4 and all(n.startswith("e") and n.split(".", 1)[1] in moments for n in second)
        assert r["twice_files"] == sorted(["owner"] + moments + second) and r["twice_after"] is False
    f0, f1 = (r["fault"] for r in results)
    assert "disk under nvme_path is full" in f1  # rank 1's own error, with the file
    assert "failed on rank(s) [1]" in f0


def _bad_path_on_one_rank(tmp):
    rank = dist.get_rank()
    path = tmp if rank == 0 else os.path.join(tmp, "missing")
    try:
        _engine(_nvme(path))
    except NVMeSwapError as exc:
        return str(exc)
    return None


def test_bad_nvme_path_on_one_rank_is_an_error_on_every_rank(tmp_path):
    r0, r1 = run_distributed(_bad_path_on_one_rank, 2, str(tmp_path), timeout=120)
    assert "nvme_path" in r1 and "does not exist" in r1
    assert "failed on rank 1" in r0 and "does not exist" in r0


# -- GPU ------------------------------------------------------------------------------------------------------
def _local_snapshot(eng):
    """One rank's params and Adam states as local tensors (world size 1: the whole tensors; no collective over CPU
    shards on an NCCL mesh)."""
    params = {n: (p._local_tensor if hasattr(p, "_local_tensor") else p).detach().float().cpu().clone()
              for n, p in eng.module.named_parameters()}
    states = [[float(eng.optimizer.state[p]["step"])] + [eng.optimizer.state[p][k]._local_tensor.cpu().clone()
                                                          for k in ("exp_avg", "exp_avg_sq")]
              for group in eng.optimizer.param_groups for p in group["params"]]
    return {"params": params, "states": states}


def _gpu_runs(tmp):
    path = os.path.join(tmp, "nvme")
    os.makedirs(path, exist_ok=True)

    def engine(zero):
        cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**6, "gradient_clipping": CLIP,
               "bf16": {"enabled": True, "auto_cast": True},
               "zero_optimization": {"stage": 3, **Z3, **zero, "offload_param": {"device": "cpu", "pin_memory": True}}}
        model = make_model().cuda()
        return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)

    def train(eng, steps, first=0):
        out = []
        for step in range(first, first + steps):
            x, y = micro_batch(step, 0, 0, 1, 2, 1)
            eng.backward(eng(x.cuda(), y.cuda()))
            eng.step()
            out.append(_local_snapshot(eng))
        return out

    cpu = train(engine({"offload_optimizer": {"device": "cpu", "pin_memory": True}, "sub_group_size": SUB}), STEPS)
    nvme_engine = engine({"offload_optimizer": {"device": "nvme", "nvme_path": path, "pin_memory": True},
                          "sub_group_size": SUB})
    nvme = train(nvme_engine, STEPS)
    out = {"same": _same(nvme, cpu), "optimizer": type(nvme_engine.optimizer).__name__,
           "pinned": all(p._local_tensor.is_pinned() for p in nvme_engine.policy.sharded),
           "bytes": nvme_engine.model_state_bytes()}
    ckpt = os.path.join(tmp, "ckpt")
    nvme_engine.save_checkpoint(ckpt, tag="t")
    tail = train(nvme_engine, 1, STEPS)
    del nvme_engine  # one live engine per swap directory
    gc.collect()
    fresh = engine({"offload_optimizer": {"device": "nvme", "nvme_path": path}, "sub_group_size": SUB})
    fresh.load_checkpoint(ckpt, tag="t")
    out["resume"] = _same(train(fresh, 1, STEPS), tail)
    return out


@pytest.mark.gpu
@requires_gpus(1)
def test_nccl_stage3_nvme_equals_cpu_offload(tmp_path):
    for r in run_distributed(_gpu_runs, 1, str(tmp_path), backend="nccl", timeout=300):
        assert r["optimizer"] == "NVMeShardAdam" and r["pinned"]
        assert r["same"] and r["resume"]
        assert r["bytes"]["nvme"] == r["bytes"]["optimizer_states"] > 0
