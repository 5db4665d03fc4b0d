"""ZeRO-1/2 with a pipeline: the rank worker (2 stages x 2-way data parallel), run in one spawn by
``test_pipe_zero.py``. Cases reuse ``pipe_more_cases``' layer lists and single-process reference."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from pipe_cases import LR, MICRO, MOMENTUM, BASE_SEED, batches, lm_loss
from pipe_more_cases import _specs

from ds_pipe import PipelineEngine, PipelineModule


def zero_config(case, n_micro, schedule):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": n_micro,
           "pipeline": {"schedule": schedule}}
    if case.get("zero"):
        cfg["zero_optimization"] = {"stage": case["zero"]}
    if case.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if case.get("dtype") == "fp16":
        cfg["fp16"] = {"enabled": True, **case.get("fp16", {})}
    if case.get("clip"):
        cfg["gradient_clipping"] = case["clip"]
    return cfg


def zero_engine(case, stages, n_micro, zero, base_seed=BASE_SEED, resumed=False):
    virtual, schedule = (1, "1f1b") if resumed else (case.get("virtual", 1), case.get("schedule", "1f1b"))
    module = PipelineModule(_specs(case), num_stages=stages, loss_fn=lm_loss, seed_layers=True,
                            base_seed=base_seed, partition_method=case.get("partition", "uniform"),
                            virtual_stages=virtual)
    sched = (lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=case["gamma"])) if case.get("gamma") else None
    return PipelineEngine(module, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM),
                          config=zero_config({**case, "zero": zero}, n_micro, schedule), lr_scheduler=sched)


def _full(p):
    """ZeRO-3: the whole parameter from the data group's shards (a collective every replica runs)."""
    return p.full_tensor() if isinstance(p, DTensor) else p


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _steps(engine, steps, n_micro):
    dp_rank = engine.grid.get_data_parallel_rank()
    out = []
    for step in steps:
        # count the reduce-scatters of the step (FSDP's, which looks dist.reduce_scatter_single up per call)
        real, calls = dist.reduce_scatter_single, []

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        dist.reduce_scatter_single = counting
        try:
            loss = engine.train_batch(iter(step[dp_rank * n_micro:(dp_rank + 1) * n_micro]))
        finally:
            dist.reduce_scatter_single = real
        zero = engine.zero
        out.append({
            "loss": loss.item(), "norm": engine.get_global_grad_norm(), "lr": engine.get_lr(),
            "skipped": engine.skipped_steps, "scale": engine.get_loss_scale(),
            # the module's own parameters after the step (fp32: the masters; bf16: the masters rounded)
            "params": {n: _full(p).detach().float().clone() for n, p in engine.module.named_parameters()},
            # what this rank holds: its shard sizes, the optimizer's state sizes and the gradient shards it
            # stepped with
            "shards": [lay.shard for lay in zero.layouts] if zero else None,
            "padded": [lay.padded for lay in zero.layouts] if zero else None,
            "state_numel": sum(_local(t).numel() for s in engine.optimizer.state.values() for t in s.values()
                               if torch.is_tensor(t) and t.dim() > 0),
            "param_types": sorted({type(p).__name__ for p in engine.module.parameters()}),
            "reduce_scatters": len(calls), "n_micro": n_micro,
            "fsdp_units": sum(isinstance(m, FSDPModule) for m in engine.module.modules()),
            "grad_numel": [g.numel() for g in zero._shard_grads] if zero else None,
            "stage_numel": sum(p.numel() for p in engine.module.parameters())})
    return out


def zero_case(case):
    world = dist.get_world_size()
    stages = case["stages"]
    total_micro = case["micro"]
    data = batches(case["steps"], total_micro)
    engine = zero_engine(case, stages, total_micro // (world // stages), case["zero"])
    out = {"stage": engine.stage_id, "dp_rank": engine.grid.get_data_parallel_rank(), "parts": engine.module.parts}
    if case.get("dir") is None:
        out["steps"] = _steps(engine, data, engine.micro_batches)
        return out
    out["before"] = _steps(engine, data[:case["save_at"]], engine.micro_batches)
    engine.save_checkpoint(case["dir"])
    out["files"] = None
    if dist.get_rank() == 0:
        import os
        out["files"] = sorted(os.listdir(os.path.join(case["dir"], "global_step%d" % case["save_at"])))
    del engine
    out["resumed"] = []
    for stages_, zero in case["load"]:
        fresh = zero_engine(case, stages_, total_micro // (world // stages_), zero, base_seed=BASE_SEED + 1000,
                            resumed=True)
        fresh.load_checkpoint(case["dir"])
        out["resumed"].append({"stage": fresh.stage_id, "parts": fresh.module.parts,
                               "steps": _steps(fresh, data[case["save_at"]:], fresh.micro_batches)})
        dist.barrier()
    return out


def run_zero_cases(cases):
    out = []
    for case in cases:
        out.append(zero_case(case))
        dist.barrier()
    return out
