"""NVMe offload of the optimizer (``offload_optimizer: {device: nvme, nvme_path}``, ``ds_zero._swap``).

The NVMe step runs the same Numba Adam kernel as CPU offload's CPUAdam, only on sub-groups swapped in from files,
so on 2 gloo ranks it must equal CPU offload *bit for bit*: fp32 masters, Adam's states and the 16-bit params, at
stages 1 and 2 with accumulation and clipping that fires, and with an fp16 overflow on one rank (skipped
everywhere), with ``sub_group_size`` small enough that every group takes several sub-groups (the read of the next
one overlapping the step of the current one). Checkpoints: resume bit for bit, and the NVMe checkpoint loads into
a CPU-offload run. The swap files exist during the run (the masters and states are file mappings: ``nvme`` bytes,
not host bytes) and are gone once the engine is.

Faults (single process, or 2 ranks where agreement matters): an ``nvme_path`` that is missing on one rank fails
on every rank, naming it; too little free space and too little host memory are refused before training with the
amounts; a write that fails mid-step (a full disk) names the file; a directory held by a live process is refused;
a killed run's files are removed at the next start; config rules."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from pydantic import ValidationError
from zero_cases import base_config, make_model, micro_batch, param_groups

import ds_zero
from ds_zero import EngineConfig
from ds_zero import _swap

STEPS, GA, CLIP, SUB = 3, 2, 0.05, 100


def _nvme(path, direct_io=False):
    # buffered by default: O_DIRECT would round SUB up to 1024 elements, one sub-group per group of this model,
    # and these tests want several (the overlap); O_DIRECT against buffered: test_offload_nvme_direct.py
    return {"offload_optimizer": {"device": "nvme", "nvme_path": str(path), "pin_memory": True,
                                  "direct_io": direct_io}, "sub_group_size": SUB}


CPU = {"offload_optimizer": {"device": "cpu", "pin_memory": True}, "sub_group_size": SUB}


# -- config --------------------------------------------------------------------------------------------------
def test_nvme_config():
    cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 2, **_nvme("/tmp")}})
    off = cfg.zero_optimization.offload_optimizer
    assert off.device == "nvme" and off.nvme_path == "/tmp"
    # DeepSpeed's NVMe pipelining knobs are accepted; nvme_path is ignored with device cpu, as DeepSpeed does
    EngineConfig.model_validate({"zero_optimization": {"stage": 1, "offload_optimizer": {
        "device": "nvme", "nvme_path": "/tmp", "pipeline_read": True, "pipeline_write": True, "buffer_count": 8}}})
    EngineConfig.model_validate({"zero_optimization": {"stage": 1, "offload_optimizer": {
        "device": "cpu", "nvme_path": "/tmp"}}})


@pytest.mark.parametrize("zero,match", [
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, "needs offload_optimizer.nvme_path"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp", "ratio": 0.5}}, "'ratio'"),
])
def test_nvme_config_refusals(zero, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate({"zero_optimization": zero})


# -- 2 ranks: NVMe equals CPU offload --------------------------------------------------------------------------
def _engine(stage, dtype, zero, clip=CLIP, ga=GA, opt=None):
    model = make_model()
    extra = {dtype: {"enabled": True, "auto_cast": True}, "gradient_clipping": clip, "zero": zero}
    if dtype == "fp16":
        extra[dtype].update(initial_scale_power=8, hysteresis=1)
    optimizer = opt(model) if opt else torch.optim.AdamW(param_groups(model), lr=1e-2)
    return ds_zero.ZeroEngine(model, optimizer, base_config(stage, 2, ga, **extra))


def _train(engine, steps, first=0, inf_at=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    ga = engine.gradient_accumulation_steps()
    out = []
    for step in range(first, first + steps):
        for micro in range(ga):
            x, y = micro_batch(step, micro, rank, world, 2, ga)
            if inf_at == (step, rank) and micro == 0:
                x = x.clone()
                x[0, 0] = float("inf")
            engine.backward(engine(x, y))
            engine.step()
        opt = engine.optimizer
        out.append({"masters": [p.detach().clone() for p in engine.masters.params if p is not None],
                    "states": [opt.state_dict()["state"][i][k].clone() for i in range(len(opt.param_groups))
                               for k in ("exp_avg", "exp_avg_sq")],
                    "params": [p.detach().float().clone() for p in engine.module.parameters()],
                    "skipped": engine.was_step_skipped})
    return out


def _same(a, b):
    return all(torch.equal(x, y) for sa, sb in zip(a, b) for k in ("masters", "states", "params")
               for x, y in zip(sa[k], sb[k])) and [s["skipped"] for s in a] == [s["skipped"] for s in b]


def _scenarios(tmp):
    rank = dist.get_rank()
    path = os.path.join(tmp, f"nvme{rank}")  # one directory per rank, as on one disk per node
    os.makedirs(path, exist_ok=True)
    out = {}
    for stage in (1, 2):
        for dtype, inf_at in (("bf16", None), ("fp16", (1, 1))):
            eng = None  # the previous NVMe engine goes first (a live one would make this one's files take own names)
            cpu = _train(_engine(stage, dtype, CPU), STEPS, inf_at=inf_at)
            eng = _engine(stage, dtype, _nvme(path))
            nvme = _train(eng, STEPS, inf_at=inf_at)
            out[stage, dtype] = {"same": _same(nvme, cpu), "skipped": [s["skipped"] for s in nvme],
                                 "moved": nvme[-1]["masters"][0].ne(cpu[0]["masters"][0]).any().item()}
            if (stage, dtype) == (2, "bf16"):
                swap = os.path.join(path, "ds_zero_swap", f"rank{rank}")
                out["evidence"] = {"optimizer": type(eng.optimizer).__name__, "bytes": eng.model_state_bytes(),
                                   "files": sorted(os.listdir(swap)), "cpu_steps": eng.offload.cpu_steps,
                                   "sub_groups": -(-max(p.numel() for p in eng.masters.params if p is not None)
                                                   // eng.optimizer.sub_group_size),
                                   "mapped": [p.data.untyped_storage().filename for p in eng.masters.params
                                              if p is not None]}
                del eng
                gc.collect()
                out["files_after"] = os.path.exists(swap)
    # resume: 2 steps, save, 1 more, against a fresh NVMe engine and a fresh CPU-offload engine that load
    ckpt = os.path.join(tmp, "ckpt")
    whole = _engine(2, "bf16", _nvme(path))
    _train(whole, 2)
    whole.save_checkpoint(ckpt, tag="t")
    tail = _train(whole, 1, first=2)
    del whole
    gc.collect()
    again = _engine(2, "bf16", _nvme(path))
    again.load_checkpoint(ckpt, tag="t")
    out["resume_nvme"] = _same(_train(again, 1, first=2), tail)
    del again
    gc.collect()
    cpu = _engine(2, "bf16", CPU)
    cpu.load_checkpoint(ckpt, tag="t")
    out["resume_cpu"] = _same(_train(cpu, 1, first=2), tail)
    return out


def test_nvme_equals_cpu_offload_bit_for_bit_and_resumes(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("nvme"))
    for rank, r in enumerate(run_distributed(_scenarios, 2, tmp, timeout=300)):
        for key in ((1, "bf16"), (1, "fp16"), (2, "bf16"), (2, "fp16")):
            assert r[key]["same"] and r[key]["moved"], (rank, key)
        assert r[1, "fp16"]["skipped"] == [False, True, False]
        ev = r["evidence"]
        assert ev["optimizer"] == "NVMeAdam" and ev["cpu_steps"] == STEPS and ev["sub_groups"] >= 3
        assert ev["files"] == sorted(["owner"] + [f"group{g}.{k}" for g in (0, 1)
                                                  for k in ("param", "exp_avg", "exp_avg_sq")])
        assert all(name and "ds_zero_swap" in name for name in ev["mapped"])
        b = ev["bytes"]  # masters and states are on the disk: none of them in host memory
        assert b["nvme"] == b["master_params"] + b["optimizer_states"] and b["host"] == 0 and b["nvme"] > 0
        assert r["files_after"] is False  # removed with the engine
        assert r["resume_nvme"] and r["resume_cpu"]
    # the 2-rank NVMe checkpoint resharded into one process (stage 0 bf16: masters and states rebuilt by name),
    # NVMe against CPU offload: the loaded states went into the swap files, the step is the same kernel
    runs = {}
    for name, zero in (("nvme", _nvme(os.path.join(tmp, "one"))), ("cpu", CPU)):
        os.makedirs(os.path.join(tmp, "one"), exist_ok=True)
        engine = _engine(0, "bf16", zero, ga=1)
        engine.load_checkpoint(os.path.join(tmp, "ckpt"), tag="t")
        x, y = micro_batch(2, 0, 0, 1, 2, 1)
        engine.backward(engine(x, y))
        engine.step()
        runs[name] = ([p.detach().clone() for p in engine.masters.params if p is not None],
                      engine.optimizer.state_dict()["state"])
        del engine
        gc.collect()
    assert all(torch.equal(a, b) for a, b in zip(runs["nvme"][0], runs["cpu"][0]))
    for i, st in runs["cpu"][1].items():
        assert float(runs["nvme"][1][i]["step"]) == float(st["step"]) == 3
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(runs["nvme"][1][i][k], st[k]) and st[k].abs().sum() > 0


def _bad_path_on_one_rank(tmp):
    rank = dist.get_rank()
    path = tmp if rank == 0 else os.path.join(tmp, "missing")
    try:
        _engine(2, "bf16", _nvme(path))
    except _swap.NVMeSwapError as exc:
        return str(exc)
    return None


def test_bad_nvme_path_on_one_rank_is_an_error_on_every_rank(tmp_path):
    r0, r1 = run_distributed(_bad_path_on_one_rank, 2, str(tmp_path), timeout=120)
    assert "nvme_path" in r1 and "does not exist" in r1
    assert "failed on rank 1" in r0 and "does not exist" in r0


# -- faults, one process --------------------------------------------------------------------------------------
def test_not_a_directory_and_non_adam_are_named(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(_swap.NVMeSwapError, match="nvme_path .* is not a directory"):
        _engine(2, "bf16", _nvme(f))
    with pytest.raises(ValueError, match="'nvme' swaps Adam's states: it steps Adam/AdamW only, got SGD"):
        _engine(2, "bf16", _nvme(tmp_path), opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))


def test_too_little_space_and_host_memory_are_refused_with_the_amounts(tmp_path, monkeypatch):
    real = _swap.shutil.disk_usage
    monkeypatch.setattr(_swap.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(_swap.NVMeSwapError, match=r"swap files need 0\.00 GiB .* has 0\.00 GiB free"):
        _engine(2, "bf16", _nvme(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(_swap, "_mem_available", lambda: 1000)
    with pytest.raises(_swap.NVMeSwapError, match="needs .* of host memory, 0.00 GiB is available; lower "
                                                  "zero_optimization.sub_group_size"):
        _engine(2, "bf16", _nvme(tmp_path))


def test_a_full_disk_mid_step_names_the_file(tmp_path, monkeypatch):
    engine = _engine(1, "bf16", _nvme(tmp_path), ga=1)

    def full(fd, bufs, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_swap.os, "pwritev", full)
    x, y = micro_batch(0, 0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    with pytest.raises(_swap.NVMeSwapError, match=r"write of '.*group\d\.\w+' at element \d+ failed \(the disk under "
                                                  r"nvme_path is full\)"):
        engine.step()


def test_stale_files_are_removed_and_a_live_owner_refused(tmp_path):
    import socket

    swap = tmp_path / "ds_zero_swap" / "rank0"
    swap.mkdir(parents=True)
    (swap / "group0.param").write_bytes(b"\0" * 4096)  # a killed run's file
    (swap / "owner").write_text(f"{socket.gethostname()} 999999999\n")  # its pid is gone
    engine = _engine(1, "bf16", _nvme(tmp_path), ga=1)
    assert (swap / "owner").read_text().split()[1] == str(os.getpid())
    assert os.path.getsize(swap / "group0.param") == 4 * engine.masters.params[0].numel()
    del engine
    gc.collect()
    assert not swap.exists()
    swap.mkdir(parents=True)
    (swap / "owner").write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live process holds it
    with pytest.raises(_swap.NVMeSwapError, match=f"in use by process {os.getppid()}"):
        _engine(1, "bf16", _nvme(tmp_path), ga=1)
