"""ZeRO-3 offload (``offload_optimizer`` / ``offload_param`` with ``device: cpu`` at stage 3, FSDP2's
``CPUOffloadPolicy``) on 2 gloo processes.

Parity: the offloaded run against the same run without offload and against the single-process reference
(plain torch + ``torch.optim.AdamW`` over the global batch): losses and every full param at every step, with
accumulation and clipping that fires, biases kept whole by the persistence threshold (their fp32 masters move to
the CPU), bf16, and an fp16 overflow on one rank skipped everywhere; the full AdamW states (CPUAdam's) against
the run without offload. Checkpoints: an offloaded run resumes bit for bit, and its checkpoint loads into a run
without offload. On this CPU-only machine the "device" is the CPU too, so the tests also check that the offload
path ran: FSDP2's params carry the offload policy, the optimizer is ds-optim's CPUAdam stepping the CPU shards,
the persistent masters are CPU tensors, and the byte count puts masters, states and shard grads on the host."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from pydantic import ValidationError
from zero_cases import base_config, compare, full_state, make_model, micro_batch, param_groups, reference

import ds_zero
from ds_zero import EngineConfig

Z3 = {"param_persistence_threshold": 30, "shard_units": ["Linear"]}  # biases persistent, weights sharded
BOTH = {"offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}}
OPT_ONLY = {"offload_optimizer": {"device": "cpu"}}
PARAM_ONLY = {"offload_param": {"device": "cpu"}}  # served as both: the shards are the masters
STEPS, GA, CLIP = 4, 2, 0.05


# -- config --------------------------------------------------------------------------------------------------
def test_stage3_offload_config():
    cfg = EngineConfig.model_validate({"zero_optimization": {"stage": 3, **BOTH}})
    assert cfg.zero_optimization.offload_param.pin_memory is True
    legacy = EngineConfig.model_validate({"zero_optimization": {"stage": 3, "cpu_offload_param": True,
                                                                 "cpu_offload_use_pin_memory": True}})
    assert legacy.zero_optimization.offload_param.pin_memory is True
    # DeepSpeed's NVMe-only knobs are accepted (1e8 written as a float too); "none" is off
    ok = EngineConfig.model_validate({"zero_optimization": {"stage": 3, "offload_param": {
        "device": "cpu", "buffer_count": 4, "buffer_size": 1e8, "max_in_cpu": 1e9}}})
    assert ok.zero_optimization.offload_param.buffer_size == 100_000_000
    assert EngineConfig.model_validate({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}
                                       ).zero_optimization.offload_param is None


@pytest.mark.parametrize("zero,match", [
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "offload_param.device = 'nvme' needs offload_param.nvme_path"),
    ({"stage": 2, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, "offload_param .* needs stage 3, got stage 2"),
    ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param .* needs stage 3, got stage 2"),
    ({"stage": 3, "cpu_offload_param": True, "offload_param": {"device": "cpu"}}, "both cpu_offload_param"),
    ({"stage": 3, "offload_param": {"device": "disk"}}, "must be \"cpu\", \"nvme\""),
])
def test_stage3_offload_refusals_name_the_key(zero, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate({"zero_optimization": zero})


# -- distributed --------------------------------------------------------------------------------------------
def _engine(offload, dtype=None, clip=CLIP, ga=GA, model=None, sched=False):
    model = model if model is not None else make_model()
    extra = {"zero": {**Z3, **offload}, "gradient_clipping": clip}
    if dtype == "fp16":
        extra["fp16"] = {"enabled": True, "auto_cast": True, "initial_scale_power": 10, "hysteresis": 1}
    elif dtype == "bf16":
        extra["bf16"] = {"enabled": True, "auto_cast": True}
    scheduler = (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)) if sched else None
    return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2),
                              base_config(3, 1, ga, **extra), lr_scheduler=scheduler)


def _train(engine, steps, first=0, inf_at=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    ga = engine.gradient_accumulation_steps()
    out = []
    for step in range(first, first + steps):
        losses = []
        for micro in range(ga):
            x, y = micro_batch(step, micro, rank, world, 1, ga)
            if inf_at == (step, rank):
                x = x.clone()
                x[0, 0] = float("inf")
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        out.append({"loss": sum(losses) / ga, "params": full_state(engine.module),
                    "skipped": engine.was_step_skipped, "scale": engine.loss_scale})
    return out


def _states(engine):
    """The full Adam states of every trainable param, by name (sharded ones gathered: collective)."""
    names = {p: n for n, p in engine.module.named_parameters()}
    out = {}
    for p in engine.policy.sharded:
        st = engine.optimizer.state[p]
        out[names[p]] = {k: st[k].full_tensor().clone() for k in ("exp_avg", "exp_avg_sq")}
    return out


def _evidence(engine):
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    fsdp_params = [fp for m in engine.module.modules() if (st := _get_module_fsdp_state(m)) is not None
                   and st._fsdp_param_group is not None for fp in st._fsdp_param_group.fsdp_params]
    return {"optimizer": type(engine.optimizer).__name__,
            "fsdp_offload": sorted({fp.offload_to_cpu for fp in fsdp_params}),
            "shard_devices": sorted({p._local_tensor.device.type for p in engine.policy.sharded}),
            "master_devices": sorted({p.device.type for p in engine.masters.params if p is not None}),
            "persistent_param_devices": sorted({p.device.type for b in engine.buckets for p in b.params}),
            "bytes": engine.model_state_bytes()}


def _all_scenarios(tmp):
    rank = dist.get_rank()
    out = {}
    for name, offload in (("plain", {}), ("both", BOTH), ("opt-only", OPT_ONLY), ("param-only", PARAM_ONLY)):
        engine = _engine(offload)
        out[f"fp32-{name}"] = _train(engine, STEPS)
        out[f"fp32-{name}-states"] = _states(engine)
        if name == "both":
            out["evidence"] = _evidence(engine)
    out["bf16-plain"] = _train(_engine({}, "bf16"), 3)
    out["bf16-both"] = _train(_engine(BOTH, "bf16"), 3)
    out["fp16-both"] = _train(_engine(BOTH, "fp16", clip=0.0, ga=1), 4, inf_at=(1, 1))
    # resume: 2 steps, save, 2 more; a fresh offloaded engine loads and takes the same 2 steps; a fresh engine
    # without offload loads the offloaded checkpoint
    a = _engine(BOTH, "bf16", sched=True)
    _train(a, 2)
    a.save_checkpoint(tmp, tag="t")
    out["resume-continued"] = _train(a, 2, first=2)
    b = _engine(BOTH, "bf16", sched=True, model=make_model(seed=5))
    b.load_checkpoint(tmp, tag="t")
    out["resume-offload"] = _train(b, 2, first=2)
    c = _engine({}, "bf16", sched=True, model=make_model(seed=6))
    c.load_checkpoint(tmp, tag="t")
    out["resume-plain"] = _train(c, 2, first=2)
    # a model built under Init, materialised straight into the CPU shards, equals the eagerly built one
    eager = make_model()
    torch.manual_seed(0)  # make_model seeds inside; Init replays from the RNG state at its entry
    with ds_zero.Init():
        lazy = type(eager)()
    out["init-offload"] = full_state(_engine(BOTH, model=lazy).module)
    out["eager-offload"] = full_state(_engine(BOTH, model=eager).module)
    out["init-shard-devices"] = sorted({p._local_tensor.device.type for p in dict.fromkeys(lazy.parameters())
                                        if hasattr(p, "_local_tensor")})
    out["rank"] = rank
    return out


_cache = {}


def _results(tmp_path_factory):
    if "r" not in _cache:
        tmp = str(tmp_path_factory.mktemp("z3off"))
        _cache["r"] = run_distributed(_all_scenarios, 2, tmp, timeout=300)
    return _cache["r"]


def _close(a, b, rtol=1e-5, atol=1e-6):
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(y["loss"])), (step, x["loss"], y["loss"])
        for k in y["params"]:
            torch.testing.assert_close(x["params"][k], y["params"][k], rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step} {k}: {m}")


@pytest.mark.parametrize("which", ["both", "opt-only", "param-only"])
def test_stage3_offload_equals_reference_and_no_offload(tmp_path_factory, which):
    res = _results(tmp_path_factory)
    # against the single-process reference, with the stage-3 tests' fp32 tolerances
    compare([r[f"fp32-{which}"] for r in res], reference(STEPS, batch=GA * 2, clip=CLIP))
    for r in res:
        _close(r[f"fp32-{which}"], r["fp32-plain"])
        for name, st in r[f"fp32-{which}-states"].items():
            for key, value in st.items():  # CPUAdam's states against torch AdamW's (no offload)
                torch.testing.assert_close(value, r["fp32-plain-states"][name][key], rtol=1e-5, atol=1e-8,
                                           msg=lambda m: f"{key} of {name}: {m}")


def test_stage3_offload_path_ran(tmp_path_factory):
    for r in _results(tmp_path_factory):
        ev = r["evidence"]
        assert ev["optimizer"] == "CPUAdam"
        assert ev["fsdp_offload"] == [True]
        assert ev["shard_devices"] == ["cpu"] and ev["master_devices"] == ["cpu"]
        b = ev["bytes"]
        assert b["device"] + b["host"] == b["total"]
        # on a CPU engine "device" bytes are what stays on the device: the persistent params (and their grads)
        assert 0 < b["device"] < b["host"] and b["host"] >= b["master_params"] + b["optimizer_states"]


def test_stage3_offload_bf16_equals_no_offload(tmp_path_factory):
    for r in _results(tmp_path_factory):
        # the params read back are the fp32 shards: CPUAdam against torch AdamW, fp32 round-off apart
        _close(r["bf16-both"], r["bf16-plain"])
        assert r["bf16-both"][-1]["loss"] != r["bf16-both"][0]["loss"]


def test_stage3_offload_fp16_overflow_on_one_rank_skips_everywhere(tmp_path_factory):
    res = _results(tmp_path_factory)
    for r in res:
        h = r["fp16-both"]
        assert [s["skipped"] for s in h] == [False, True, False, False]
        assert h[2]["scale"] == h[0]["scale"] / 2
        for k, v in h[1]["params"].items():
            torch.testing.assert_close(v, h[0]["params"][k], rtol=0, atol=0)
    for k, v in res[0]["fp16-both"][-1]["params"].items():
        torch.testing.assert_close(v, res[1]["fp16-both"][-1]["params"][k], rtol=0, atol=0)


def test_stage3_offload_resume_bit_for_bit_and_into_no_offload(tmp_path_factory):
    for r in _results(tmp_path_factory):
        _close(r["resume-offload"], r["resume-continued"], rtol=0, atol=0)
        # CPUAdam against torch AdamW from the same state: fp32 round-off, then bf16 rounding of the params
        _close(r["resume-plain"], r["resume-continued"], rtol=1e-2, atol=2e-3)


def test_stage3_offload_of_a_model_built_under_init(tmp_path_factory):
    for r in _results(tmp_path_factory):
        assert r["init-shard-devices"] == ["cpu"]
        for k, v in r["eager-offload"].items():
            torch.testing.assert_close(r["init-offload"][k], v, rtol=0, atol=0)
