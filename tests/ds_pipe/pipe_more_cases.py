"""Rank workers and the single-process reference for ds-pipe's checkpoints and mixed precision / clipping.

The reference does the pipeline's arithmetic in one process, step for step, so fp16/bf16 runs can be compared
tightly: the layers in the run's dtype with fp32 masters; a tied module has one 16-bit copy per stage that uses
it (each accumulates its own micro-batch gradients in 16-bit, as on the pipeline); per replica the 16-bit
gradients are divided by the micro-batch count (torch's schedule), made fp32 and the tie's copies summed; then
the replicas averaged, unscaled (fp16), clipped by the global norm, and SGD with momentum steps the masters.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ds_pipe import LayerSpec, PipelineEngine, PipelineModule, TiedLayerSpec
from pipe_cases import BASE_SEED, HIDDEN, LR, MICRO, MOMENTUM, VOCAB, Block, batches, head, layers, lm_loss


class _PoisonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, poison):
        ctx.save_for_backward(x, w)
        ctx.poison = poison
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = (g * x).sum()
        if ctx.poison:
            gw = gw * float("inf")
        return g * w, gw, None


class Poison(nn.Module):
    """``x * w`` with ``w = 1``, whose ``w`` gradient is inf for its first ``n`` forward calls: an fp16 overflow
    on the stage that holds it only (the gradient it passes on stays finite)."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.n, self.calls = n, 0

    def forward(self, x):
        poison = self.calls < self.n
        self.calls += 1
        return _PoisonFn.apply(x, self.w, poison)


def layers16(poison_calls):
    return [TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN), LayerSpec(Poison, poison_calls),
            LayerSpec(Block, HIDDEN), LayerSpec(Block, HIDDEN), LayerSpec(nn.LayerNorm, HIDDEN),
            TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN, forward_fn=head)]


def _specs(case):
    if case.get("poison") is not None:
        return layers16(case["poison"])
    return layers(case.get("blocks", 2))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(case, n_micro, schedule):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": n_micro,
           "pipeline": {"schedule": schedule}}
    if case.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if case.get("dtype") == "fp16":
        cfg["fp16"] = {"enabled": True, **case.get("fp16", {})}
    if case.get("clip"):
        cfg["gradient_clipping"] = case["clip"]
    return cfg


def reference_mixed(case, data, n_micro, dp, parts):
    """Per step: loss, master params after the step, loss scale used, skipped or not, global norm."""
    return reference_phases(case, [(data, n_micro, dp, parts)])


def _build_masters(specs):
    masters = {}
    built = set()
    for i, spec in enumerate(specs):
        torch.manual_seed(BASE_SEED + i)
        if isinstance(spec, TiedLayerSpec):
            if spec.key in built:
                continue
            built.add(spec.key)
            prefix = f"tied_modules.{spec.key}."
        elif isinstance(spec, LayerSpec):
            prefix = f"{i}."
        else:
            continue
        for n, p in spec.build().named_parameters():
            masters[prefix + n] = p.detach().clone().requires_grad_()
    return masters


def _build_copies(specs, masters, parts, dtype):
    """The layers as the stages of ``parts`` hold them: 16-bit copies of the masters, a tie's copy per stage."""
    stage_of = [next(s for s in range(len(parts) - 1) if parts[s] <= i < parts[s + 1]) for i in range(len(specs))]
    copies, funcs = {}, []
    for i, spec in enumerate(specs):
        if isinstance(spec, LayerSpec):
            key = (spec.key, stage_of[i]) if isinstance(spec, TiedLayerSpec) else i
            prefix = f"tied_modules.{spec.key}." if isinstance(spec, TiedLayerSpec) else f"{i}."
            if key not in copies:
                m = spec.build().to(dtype)
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        p.copy_(masters[prefix + n])
                copies[key] = (prefix, m)
            m = copies[key][1]
            fn = spec.forward_fn if isinstance(spec, TiedLayerSpec) else None
            funcs.append((lambda x, m=m, f=fn: f(m, x)) if fn else m)
        else:
            funcs.append(spec)
    return list(copies.values()), funcs


def reference_phases(case, phases):
    """The run in one process over phases ``(steps, micro-batches per replica, dp, parts)`` (a checkpoint
    resumed on another layout changes how the 16-bit gradients are accumulated, so each phase has its own)."""
    specs = _specs(case)
    dtype = DTYPES[case.get("dtype", "fp32")]
    masters = _build_masters(specs)
    opt = torch.optim.SGD(list(masters.values()), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=case["gamma"]) if case.get("gamma") else None
    scaler = None
    if case.get("dtype") == "fp16":
        from ds_optim.loss_scaler import DynamicLossScaler
        scaler = DynamicLossScaler(**case.get("fp16", {}))
    out = []
    for data, n_micro, dp, parts in phases:
        copies, funcs = _build_copies(specs, masters, parts, dtype)

        def copy_params():  # (master name, 16-bit param) for every copy
            for prefix, m in copies:
                for n, p in m.named_parameters():
                    yield prefix + n, p

        for step in data:
            out.append(_ref_step(case, step, n_micro, dp, masters, copy_params, funcs, opt, sched, scaler))
    return out


def _ref_step(case, step, n_micro, dp, masters, copy_params, funcs, opt, sched, scaler):
    scale = scaler.cur_scale if scaler else 1.0
    grads = {n: torch.zeros_like(m) for n, m in masters.items()}
    replica_losses = []
    for r in range(dp):
        for _, p in copy_params():
            p.grad = None
        losses = []
        for x, y in step[r * n_micro:(r + 1) * n_micro]:
            h = x
            for f in funcs:
                h = f(h)
            loss = lm_loss(h, y)
            (loss.float() * scale if scaler else loss).backward()
            losses.append(loss.detach().float())
        replica_losses.append(torch.stack(losses).mean())
        tie_sum = {}
        for n, p in copy_params():
            g = p.grad.div_(n_micro).float()
            tie_sum[n] = tie_sum[n] + g if n in tie_sum else g
        for n in grads:
            grads[n] += tie_sum[n]
    for n in grads:
        grads[n] /= dp
        if scaler:
            grads[n] /= scale
    sq = sum(g.pow(2).sum() for g in grads.values())
    norm = float(sq.sqrt())
    skipped = scaler is not None and not torch.isfinite(sq)
    if skipped:
        scaler.update_scale(True)
    else:
        if case.get("clip"):
            coef = case["clip"] / (norm + 1e-6)
            if coef < 1:
                for g in grads.values():
                    g.mul_(coef)
        if scaler:
            scaler.update_scale(False)
        for n, m in masters.items():
            m.grad = grads[n]
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
        with torch.no_grad():
            for n, p in copy_params():
                p.copy_(masters[n])
    return {"loss": (sum(replica_losses) / dp).item(), "scale": scale, "skipped": skipped, "norm": norm,
            "params": {n: m.detach().clone() for n, m in masters.items()}}


def _engine(case, stages, n_micro, base_seed=BASE_SEED, resumed=False):
    """The case's engine; ``resumed``: the layout a checkpoint is loaded into (one chunk per rank, 1F1B)."""
    virtual, schedule, style = ((1, "1f1b", "loop") if resumed else
                                (case.get("virtual", 1), case.get("schedule", "1f1b"), case.get("style", "loop")))
    module = PipelineModule(_specs(case), num_stages=stages, loss_fn=lm_loss, seed_layers=True,
                            base_seed=base_seed, partition_method=case.get("partition", "uniform"),
                            virtual_stages=virtual, virtual_stage_style=style)
    sched = (lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=case["gamma"])) if case.get("gamma") else None
    engine = PipelineEngine(module, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM),
                            config=_config(case, n_micro, schedule), lr_scheduler=sched)
    return engine


def _masters(engine):
    names = engine.optimizer_param_names()
    return {names[id(p)]: p.detach().clone() for g in engine.optimizer.param_groups for p in g["params"]}


def _run_steps(engine, steps, n_micro):
    dp_rank = engine.grid.get_data_parallel_rank()
    out = []
    for step in steps:
        loss = engine.train_batch(iter(step[dp_rank * n_micro:(dp_rank + 1) * n_micro]))
        out.append({"loss": loss.item(), "scale": None, "skipped": engine.skipped_steps,
                    "norm": engine.get_global_grad_norm(), "params": _masters(engine),
                    "module_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
                    "module_params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}})
    return out


def prec_case(case):
    """Train ``steps`` steps under the case's dtype / clipping; per step what the test compares."""
    world = dist.get_world_size()
    n_micro = case["micro"]
    engine = _engine(case, case["stages"], n_micro)
    dp = engine.dp_world_size
    data = batches(case["steps"], n_micro * dp)
    scales = []
    steps = []
    for step in data:
        scales.append(engine.get_loss_scale())
        steps += _run_steps(engine, [step], n_micro)
    for s, scale in zip(steps, scales):
        s["scale"] = scale
    return {"stage": engine.stage_id, "parts": engine.module.parts, "dp": dp, "world": world, "steps": steps,
            "opt_dtypes": sorted({str(p.dtype) for g in engine.optimizer.param_groups for p in g["params"]})}


def ckpt_case(case):
    """Train ``save_at`` steps on ``save_stages`` stages, save, make a failing save, then for each of
    ``load_stages``: a fresh engine (other initial weights) loads the checkpoint and trains the remaining steps."""
    rank = dist.get_rank()
    total_micro = case["micro"]  # micro-batches per step over all replicas
    world = dist.get_world_size()
    data = batches(case["steps"], total_micro)
    save_dir = case["dir"]
    engine = _engine(case, case["save_stages"], total_micro // (world // case["save_stages"]))
    n_micro = engine.micro_batches
    out = {"save_parts": engine.module.parts, "before": _run_steps(engine, data[:case["save_at"]], n_micro)}
    path = engine.save_checkpoint(save_dir, client_state={"note": "resume", "step": engine.global_steps})
    out["path"] = path
    # a save that fails on one rank (its disk is full): every rank raises, 'latest' and the tag are untouched
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if rank == world - 1 and isinstance(f, (str, os.PathLike)):  # the files, not the client_state check
            raise OSError(f"no space left on device (test, rank {rank})")
        return real_save(obj, f, *a, **k)

    torch.save = failing_save
    try:
        engine.save_checkpoint(save_dir, tag="broken")
        out["broken"] = None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        out["broken"] = (type(exc).__name__, str(exc))
    finally:
        torch.save = real_save
    dist.barrier()
    out["listing"] = sorted(os.listdir(save_dir))
    out["files"] = sorted(os.listdir(path))
    del engine
    out["resumed"] = {}
    for stages in case["load_stages"]:
        fresh = _engine(case, stages, total_micro // (world // stages), base_seed=BASE_SEED + 1000, resumed=True)
        loaded, client = fresh.load_checkpoint(save_dir)
        out["resumed"][stages] = {
            "path": loaded, "client": client, "global_steps": fresh.global_steps, "stage": fresh.stage_id,
            "lr": fresh.get_lr(), "steps": _run_steps(fresh, data[case["save_at"]:], fresh.micro_batches)}
        dist.barrier()
    missing = _engine(case, case["save_stages"], n_micro)
    out["nothing"] = missing.load_checkpoint(os.path.join(save_dir, "no-such-run"))
    # another layer list (one block more): refused by name on every rank, not loaded half-way
    other = _engine({**case, "blocks": case.get("blocks", 2) + 1}, case["save_stages"], n_micro, resumed=True)
    try:
        other.load_checkpoint(save_dir)
        out["other_layers"] = None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        out["other_layers"] = (type(exc).__name__, str(exc))
    return out
