"""ZeRO-1/2 with a pipeline: the rank worker (2 stages x 2-way data parallel), run in one spawn by
``test_pipe_zero.py``. Cases reuse ``pipe_more_cases``' layer lists and single-process reference."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch import nn
from pipe_cases import HIDDEN, LR, MICRO, MOMENTUM, BASE_SEED, VOCAB, Block, batches, lm_loss
from pipe_more_cases import _specs

from ds_pipe import LayerSpec, PipelineEngine, PipelineModule


def untied_layers(n_blocks):
    """The test LM with its own head (no tie): V-shaped chunks under ZeRO-3 need no tie across chunks of one
    rank (rank 0 holds the first and the last chunk)."""
    return ([LayerSpec(nn.Embedding, VOCAB, HIDDEN)] + [LayerSpec(Block, HIDDEN) for _ in range(n_blocks)]
            + [LayerSpec(nn.LayerNorm, HIDDEN), LayerSpec(nn.Linear, HIDDEN, VOCAB)])


def reference_untied(case):
    """``untied_layers`` in one process (fp32): each layer seeded as ``seed_layers=True`` does; per step the
    mean loss over all micro-batches of every replica, then SGD with momentum (and the global-norm clip)."""
    mods = []
    for i, spec in enumerate(untied_layers(case.get("blocks", 2))):
        torch.manual_seed(BASE_SEED + i)
        mods.append(spec.build())
    model = nn.Sequential(*mods)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    out = []
    for step in batches(case["steps"], case["micro"]):
        opt.zero_grad()
        loss = torch.stack([lm_loss(model(x), y) for x, y in step]).mean()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), case.get("clip") or float("inf")))
        opt.step()
        out.append({"loss": float(loss.detach()), "norm": norm,
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return out


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
    if resumed == "virtual":  # a virtual-stage run resumed in its own layout
        virtual, schedule = case["virtual"], case["schedule"]
    specs = untied_layers(case.get("blocks", 2)) if case.get("untied") else _specs(case)
    module = PipelineModule(specs, num_stages=stages, loss_fn=lm_loss, seed_layers=True,
                            base_seed=base_seed, partition_method=case.get("partition", "uniform"),
                            virtual_stages=virtual,
                            virtual_stage_style="v" if schedule in ("zbv", "dualpipev") else "loop")
    sched = (lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=case["gamma"])) if case.get("gamma") else None
    return PipelineEngine(module, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM),
                          config=zero_config({**case, "zero": zero}, n_micro, schedule), lr_scheduler=sched)


def _full(p):
    """ZeRO-3: the whole parameter from the data group's shards (a collective every replica runs)."""
    return p.full_tensor() if isinstance(p, DTensor) else p


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _fsdp_units(engine):
    """The FSDP units that hold parameters (each reduce-scatters once per step): the stage module's, or with
    virtual stages every chunk's (each chunk its own root)."""
    roots = engine._chunks if engine._chunks is not None else [engine.module]
    units = {id(m): m for r in roots for m in r.modules() if isinstance(m, FSDPModule)}
    return sum(len(m._get_fsdp_state()._fsdp_param_groups) for m in units.values())


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
            "fsdp_units": _fsdp_units(engine),
            "grad_numel": [g.numel() for g in zero._shard_grads] if zero else None,
            "stage_numel": sum(p.numel() for p in engine.module.parameters())})
    return out


def zero_case(case):
    world = dist.get_world_size()
    if case.get("refused"):  # the engine must refuse this layout by name, on every rank alike
        try:
            zero_engine(case, case["stages"], case["micro"] // (world // case["stages"]), case["zero"])
        except NotImplementedError as exc:
            return {"refused": str(exc)}
        return {"refused": None}
    stages = case["stages"]
    total_micro = case["micro"]
    data = batches(case["steps"], total_micro)
    engine = zero_engine(case, stages, total_micro // (world // stages), case["zero"])
    out = {"stage": engine.stage_id, "dp_rank": engine.grid.get_data_parallel_rank(), "parts": engine.module.parts}
    if case.get("dir") is None:
        if case.get("eval"):  # before any step: the initial weights' loss, the reference's first loss
            n = engine.micro_batches
            dp_rank = engine.grid.get_data_parallel_rank()
            out["eval0"] = engine.eval_batch(iter(data[0][dp_rank * n:(dp_rank + 1) * n])).item()
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
    for k, (stages_, zero) in enumerate(case["load"]):
        fresh = zero_engine(case, stages_, total_micro // (world // stages_), zero, base_seed=BASE_SEED + 1000,
                            resumed="virtual" if k in case.get("resume_virtual", ()) else True)
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
