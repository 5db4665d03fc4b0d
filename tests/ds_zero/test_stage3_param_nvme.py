"""Parameter NVMe offload at ZeRO stage 3 (``offload_param: {device: nvme}``, ``ds_zero._swap_params``).

FSDP2's fp32 shards (the masters) become shared file mappings under ``nvme_path``; nothing else of the loop
changes, so on 2 gloo ranks a run must equal ``offload_param: cpu`` *bit for bit* -- every full param, both full
Adam states and the grad norms -- with accumulation and clipping that fires, bf16, and with the optimizer offloaded
to the CPU (CPUAdam) or to NVMe (``_swap_stage3``: the moments in files too). The shards really are the files: the
bytes of each unit's file equal the shards after a step, each local tensor's storage is the mapping, and a write to
a param shows up in the file. A checkpoint loads into a fresh NVMe engine, which continues bit for bit and keeps
the shards in the files; a ``ds_zero.Init`` model (shards made after ``fully_shard``) trains as the eager one,
and a shard something replaced is moved back by ``ParamSwap.ensure``. A missing ``nvme_path`` or a file is a
named ``NVMeSwapError`` on every rank.

GPU (NCCL, 1 GPU): ``python -m pytest -q -m gpu tests/ds_zero/test_stage3_param_nvme.py``.
"""

from __future__ import annotations

import gc
import os

import numpy as np
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


def _param(path, **extra):
    return {"offload_param": {"device": "nvme", "nvme_path": str(path), **extra}}


def test_config_accepts_param_nvme_and_needs_a_path():
    cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 3, **_param("/tmp", buffer_count=4)}})
    par = cfg.zero_optimization.offload_param
    assert par.device == "nvme" and par.nvme_path == "/tmp" and par.buffer_count == 4
    with pytest.raises(ValidationError, match="offload_param.device = 'nvme' needs offload_param.nvme_path"):
        EngineConfig.model_validate({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    with pytest.raises(ValidationError, match="offload_param .*needs stage 3"):
        EngineConfig.model_validate({"zero_optimization": {"stage": 2, **_param("/tmp")}})


def _engine(zero, model=None, sched=False):
    model = model if model is not None else make_model()
    extra = {"zero": {**Z3, "sub_group_size": SUB, **zero}, "gradient_clipping": CLIP,
             "bf16": {"enabled": True, "auto_cast": True}}
    scheduler = (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)) if sched else None
    return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), base_config(3, 1, GA, **extra),
                              lr_scheduler=scheduler)


def _states(engine):
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
        losses = []
        for micro in range(GA):
            x, y = micro_batch(step, micro, rank, world, 1, GA)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float().clone())
        out.append({"losses": losses, "params": full_state(engine.module), "states": _states(engine),
                    "norm": engine.global_grad_norm})
    return out


def _same(a, b):
    return len(a) == len(b) and all(
        all(torch.equal(x, y) for x, y in zip(sa["losses"], sb["losses"])) and sa["norm"] == sb["norm"]
        and sa["params"].keys() == sb["params"].keys()
        and all(torch.equal(v, sb["params"][k]) for k, v in sa["params"].items())
        and len(sa["states"]) == len(sb["states"]) and all(
            x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(sa["states"], sb["states"]))
        for sa, sb in zip(a, b))


def _file_evidence(eng):
    """Whether each shard's bytes in its unit's file (read with numpy, not through the mapping) equal the local
    shard, its storage is the mapping, and a write to the param reaches the file."""
    swap = eng.param_swap
    out = {"in_files": swap.all_in_files(), "file_equal": True, "storage_is_mapping": True, "write_seen": False,
           "names": sorted(os.path.basename(n) for n in swap.files.names.values())}
    for ui, placed in enumerate(swap.layout):
        if not placed:
            continue
        name = swap.files.names[ui, "param"]
        base = swap.mapped[ui].data_ptr()
        for fp, offset in placed:
            local = fp.sharded_param._local_tensor
            on_disk = np.fromfile(name, dtype=np.float32, count=local.numel(), offset=offset)
            out["file_equal"] &= bool(np.array_equal(on_disk, local.reshape(-1).numpy()))
            storage = local.untyped_storage()
            out["storage_is_mapping"] &= bool(storage.data_ptr() == base and storage.filename == name
                                               and local.data_ptr() == base + offset)
    fp, offset = swap.layout[0][0]
    ui = 0
    local = fp.sharded_param._local_tensor
    old = local.reshape(-1)[0].item()
    with torch.no_grad():
        local.reshape(-1)[0] = 1234.5  # through the param: the file must see it
    out["write_seen"] = float(np.fromfile(swap.files.names[ui, "param"], dtype=np.float32, count=1,
                                          offset=offset)[0]) == 1234.5
    with torch.no_grad():
        local.reshape(-1)[0] = old
    out["bytes"] = eng.model_state_bytes()
    out["mapped_bytes"] = sum(t.numel() for t in swap.swapped())  # uint8 mappings of the unit files
    return out


def _scenarios(tmp):
    rank = dist.get_rank()
    path = os.path.join(tmp, f"nvme{rank}")
    os.makedirs(path, exist_ok=True)
    swap = os.path.join(path, "ds_zero_swap", f"rank{rank}")
    out = {}
    cpu = _train(_engine({"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}), STEPS)
    for name, off in (("cpu_opt", {"offload_optimizer": {"device": "cpu"}}),
                      ("nvme_opt", {"offload_optimizer": {"device": "nvme", "nvme_path": path}}),
                      ("no_opt", {})):
        eng = _engine({**_param(path, pin_memory=True, buffer_count=3), **off})
        run = _train(eng, STEPS)
        out[name] = {"same": _same(run, cpu), "clipped": all(s["norm"] > CLIP for s in run),
                     "optimizer": type(eng.optimizer).__name__, "evidence": _file_evidence(eng)}
        del eng, run
        gc.collect()
        out[name]["files_after"] = os.path.exists(swap)
    out["moved"] = not torch.equal(cpu[-1]["params"]["fc2.weight"], full_state(make_model())["fc2.weight"])
    # resume: 2 steps, save, 1 more; a fresh NVMe engine (another seed) loads and takes the same step
    ckpt = os.path.join(tmp, "ckpt")
    whole = _engine({**_param(path), "offload_optimizer": {"device": "cpu"}}, sched=True)
    _train(whole, 2)
    whole.save_checkpoint(ckpt, tag="t")
    tail = _train(whole, 1, first=2)
    del whole
    gc.collect()
    again = _engine({**_param(path), "offload_optimizer": {"device": "cpu"}}, model=make_model(seed=5), sched=True)
    again.load_checkpoint(ckpt, tag="t")
    out["loaded_in_files"] = again.param_swap.all_in_files()
    out["resume"] = _same(_train(again, 1, first=2), tail)
    out["resumed_in_files"] = _file_evidence(again)["file_equal"] and again.param_swap.all_in_files()
    del again
    gc.collect()
    # a model built under ds_zero.Init: its shards are made (to_empty) and materialised after fully_shard; they
    # must go into the files after that, and train as the eager model with offload_param cpu does
    def init_engine(zero, lazy):
        torch.manual_seed(0)
        if lazy:
            with ds_zero.Init():
                model = type(make_model())()
        else:
            model = make_model(seed=0)
        cfg = base_config(3, 1, GA, zero={**Z3, **zero}, gradient_clipping=CLIP)
        return ds_zero.ZeroEngine(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), cfg)

    eager = _train(init_engine({"offload_param": {"device": "cpu"}}, False), 2)
    lazy = init_engine(_param(path), True)
    out["init"] = _same(_train(lazy, 2), eager) and lazy.param_swap.all_in_files()
    # something replaces a shard's local tensor (as an assign-load would): ensure() moves it back into the file
    fp, offset = lazy.param_swap.layout[0][0]
    replaced = fp.sharded_param._local_tensor.clone() + 1
    fp.sharded_param._local_tensor = replaced
    moved = lazy.param_swap.ensure()
    on_disk = np.fromfile(lazy.param_swap.files.names[0, "param"], dtype=np.float32, count=replaced.numel(),
                          offset=offset)
    out["ensure"] = (moved == 1 and lazy.param_swap.all_in_files()
                     and torch.equal(fp.sharded_param._local_tensor, replaced)
                     and bool(np.array_equal(on_disk, replaced.reshape(-1).numpy())))
    del lazy
    gc.collect()
    return out


def test_param_nvme_equals_param_cpu_bit_for_bit_and_resumes(tmp_path):
    results = run_distributed(_scenarios, 2, str(tmp_path), timeout=240)
    for rank, r in enumerate(results):
        assert r["moved"]
        for name, optimizer in (("cpu_opt", "CPUAdam"), ("nvme_opt", "NVMeShardAdam"), ("no_opt", "CPUAdam")):
            c = r[name]
            assert c["same"] and c["clipped"], (rank, name)
            assert c["optimizer"] == optimizer, (rank, name, c["optimizer"])
            ev = c["evidence"]
            assert ev["in_files"] and ev["file_equal"] and ev["storage_is_mapping"] and ev["write_seen"], (rank, name)
            # the root (persistent biases only: nothing sharded) has no file; fc1, fc2 (and more) one each
            assert len(ev["names"]) >= 2 and all(n.startswith(("unit", "e")) and n.endswith(".param")
                                                 for n in ev["names"] if "param" in n), ev["names"]
            b = ev["bytes"]
            # the sharded fp32 masters count under nvme; the persistent biases' masters stay in host memory
            assert 0 < ev["mapped_bytes"] < b["master_params"] <= b["host"] + ev["mapped_bytes"], (rank, name, b)
            # with the optimizer on NVMe the moments are in files as well
            moments = b["optimizer_states"] if name == "nvme_opt" else 0
            assert b["nvme"] == ev["mapped_bytes"] + moments, (rank, name, b)
            assert c["files_after"] is False, (rank, name)  # removed with the engine
        assert r["loaded_in_files"] and r["resume"] and r["resumed_in_files"], rank
        assert r["init"], rank  # a ds_zero.Init model: shards into the files after materialisation
        assert r["ensure"], rank


def _bad_path(tmp):
    rank = dist.get_rank()
    a_file = os.path.join(tmp, "a_file")
    if rank == 0:
        with open(a_file, "w") as f:
            f.write("x")
    dist.barrier()
    out = {}
    for case, path in (("missing", os.path.join(tmp, "missing")), ("file", a_file),
                       ("rank1", tmp if rank == 0 else os.path.join(tmp, "missing"))):
        try:
            _engine({**_param(path), "offload_optimizer": {"device": "cpu"}})
            out[case] = None
        except NVMeSwapError as exc:
            out[case] = str(exc)
        gc.collect()
    return out


def test_bad_param_nvme_path_is_a_named_error_on_every_rank(tmp_path):
    r0, r1 = run_distributed(_bad_path, 2, str(tmp_path), timeout=120)
    for r in (r0, r1):
        assert "zero_optimization.offload_param.nvme_path" in r["missing"] and "does not exist" in r["missing"]
        assert "offload_param.nvme_path" in r["file"] and "is not a directory" in r["file"]
    assert "does not exist" in r1["rank1"]
    assert "failed on rank 1" in r0["rank1"] and "does not exist" in r0["rank1"]


# -- GPU ------------------------------------------------------------------------------------------------------
def _gpu_runs(tmp):
    path = os.path.join(tmp, "nvme")
    os.makedirs(path, exist_ok=True)

    def engine(param):
        cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**6, "gradient_clipping": CLIP,
               "bf16": {"enabled": True, "auto_cast": True},
               "zero_optimization": {"stage": 3, **Z3, "offload_param": param,
                                     "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
        model = make_model().cuda()
        return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)

    def train(eng, steps):
        out = []
        for step in range(steps):
            x, y = micro_batch(step, 0, 0, 1, 2, 1)
            loss = eng(x.cuda(), y.cuda())
            eng.backward(loss)
            eng.step()
            params = {n: (p._local_tensor if hasattr(p, "_local_tensor") else p).detach().float().cpu().clone()
                      for n, p in eng.module.named_parameters()}
            out.append((float(loss), params))
        return out

    cpu = train(engine({"device": "cpu", "pin_memory": True}), STEPS)
    eng = engine({"device": "nvme", "nvme_path": path, "pin_memory": True})
    nvme = train(eng, STEPS)
    same = all(a[0] == b[0] and all(torch.equal(v, b[1][k]) for k, v in a[1].items()) for a, b in zip(nvme, cpu))
    return {"same": same, "in_files": eng.param_swap.all_in_files(),
            "on_cpu": all(p._local_tensor.device.type == "cpu" for p in eng.policy.sharded)}


@pytest.mark.gpu
@requires_gpus(1)
def test_nccl_param_nvme_equals_param_cpu(tmp_path):
    """GPU (NCCL, 1 GPU): ``python -m pytest -q -m gpu tests/ds_zero/test_stage3_param_nvme.py``."""
    for r in run_distributed(_gpu_runs, 1, str(tmp_path), backend="nccl", timeout=300):
        assert r["same"] and r["in_files"] and r["on_cpu"], r
