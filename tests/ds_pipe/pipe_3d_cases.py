"""The 3D case (pipeline x tensor x data) for ``test_pipe_3d.py``: a tiny MLP model, tensor parallelism either
through Megatron-style layers that take their groups from the mpu, or through torch's ``parallelize_module``
(ColwiseParallel / RowwiseParallel) on the model axis' DeviceMesh; and its single-process reference."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_pipe import LayerSpec, PipelineEngine, PipelineModule, PipelineParallelGrid, PipeModelDataParallelTopology

HIDDEN, CLASSES, MICRO, SEED, LR, MOMENTUM = 16, 8, 2, 4321, 0.1, 0.9


class _CopyToModel(torch.autograd.Function):
    """Megatron's copy_to_tensor_model_parallel_region: identity forward, all-reduce of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromModel(torch.autograd.Function):
    """Megatron's reduce_from_tensor_model_parallel_region: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class TPBlock(nn.Module):
    """A residual MLP block, its up projection split by rows (column parallel) and its down projection by
    columns (row parallel) over the mpu's model group; ``mpu=None``: the whole block (the reference). Built
    from the same seeded full layers either way, so a rank holds exactly its slice of the reference."""

    def __init__(self, hidden, mpu=None):
        super().__init__()
        self.mpu = mpu
        tp = mpu.get_model_parallel_world_size() if mpu else 1
        r = mpu.get_model_parallel_rank() if mpu else 0
        self.norm = nn.LayerNorm(hidden)
        up, down = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        rows = 2 * hidden // tp
        self.up_w = nn.Parameter(up.weight.detach()[r * rows:(r + 1) * rows].clone())
        self.up_b = nn.Parameter(up.bias.detach()[r * rows:(r + 1) * rows].clone())
        self.down_w = nn.Parameter(down.weight.detach()[:, r * rows:(r + 1) * rows].clone())
        self.down_b = nn.Parameter(down.bias.detach().clone())  # added after the reduction: replicated
        for p in (self.up_w, self.up_b, self.down_w):
            p.model_parallel = True  # DeepSpeed's / Megatron's flag: a piece of a split tensor

    def forward(self, x):
        group = self.mpu.get_model_parallel_group() if self.mpu else None
        h = self.norm(x)
        if group is not None:
            h = _CopyToModel.apply(h, group)
        h = F.linear(torch.tanh(F.linear(h, self.up_w, self.up_b)), self.down_w)
        if group is not None:
            h = _ReduceFromModel.apply(h, group)
        return x + h + self.down_b


class Block(nn.Module):
    """The same block in plain layers, for torch's ``parallelize_module``."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


def specs(kind, mpu, n_blocks=4):
    block = [LayerSpec(TPBlock, HIDDEN, mpu) for _ in range(n_blocks)] if kind == "megatron" else \
        [LayerSpec(Block, HIDDEN) for _ in range(n_blocks)]
    return block + [LayerSpec(nn.Linear, HIDDEN, CLASSES)]


def batches(steps, n):
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(MICRO, HIDDEN, generator=g), torch.randint(0, CLASSES, (MICRO,), generator=g))
             for _ in range(n)] for _ in range(steps)]


def reference(kind, data, clip):
    """One process: the same layers whole, seeded per layer index as seed_layers=True does; SGD momentum over
    the mean loss of all micro-batches of a step; clipping by the global norm."""
    funcs, named = [], {}
    for i, spec in enumerate(specs(kind, None)):
        torch.manual_seed(SEED + i)
        m = spec.build()
        funcs.append(m)
        named.update({f"{i}.{n}": p for n, p in m.named_parameters()})
    opt = torch.optim.SGD(list(named.values()), lr=LR, momentum=MOMENTUM)
    out = []
    for step in data:
        losses = []
        for x, y in step:
            h = x
            for f in funcs:
                h = f(h)
            loss = F.cross_entropy(h, y)
            (loss / len(step)).backward()
            losses.append(loss.detach())
        norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in named.values())))
        if clip and clip / (norm + 1e-6) < 1:
            for p in named.values():
                p.grad.mul_(clip / (norm + 1e-6))
        opt.step()
        opt.zero_grad()
        out.append({"loss": torch.stack(losses).mean().item(), "norm": norm,
                    "params": {n: p.detach().clone() for n, p in named.items()}})
    return out


def _engine(case, pp, dp, base_seed=SEED):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=2, num_dp=dp)
    grid = PipelineParallelGrid(topo)  # the mpu; Megatron-style layers get their groups from it
    module = PipelineModule(specs(case["kind"], grid), topology=grid, loss_fn=F.cross_entropy, seed_layers=True,
                            base_seed=base_seed, partition_method="type:block")
    if case["kind"] == "dtensor":
        mesh = grid.get_model_parallel_mesh()
        for layer in module.children():
            if isinstance(layer, Block):
                parallelize_module(layer, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    total = case["micro"] * 2  # micro-batches per step over the replicas (2 replicas in the 2 x 2 x 2 layout)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": total // dp,
              "pipeline": {"schedule": case.get("schedule", "1f1b")}}
    if case.get("zero"):
        config["zero_optimization"] = {"stage": case["zero"]}
    if case.get("clip"):
        config["gradient_clipping"] = case["clip"]
    return PipelineEngine(module, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM), config, mpu=grid)


def _train(engine, steps):
    grid = engine.grid
    n_micro, dp_rank = engine.micro_batches, grid.get_data_parallel_rank()
    losses, norms = [], []
    for step in steps:
        losses.append(engine.train_batch(iter(step[dp_rank * n_micro:(dp_rank + 1) * n_micro])).item())
        norms.append(engine.get_global_grad_norm())
    return losses, norms


def _pieces(engine):
    return {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
            for n, p in engine.module.named_parameters()}


def run_3d(case):
    """Pipeline 2 x tensor 2 x data 2 on 8 ranks: the loss curve, norms and this rank's parameter pieces.
    With ``save_at``: saved after that many steps, resumed on ``load`` = (pipe, data) (tensor 2) by a fresh
    engine with other initial weights, which trains the remaining steps."""
    engine = _engine(case, 2, 2)
    grid = engine.grid
    data = batches(case["steps"], case["micro"] * 2)
    out = {"coord": (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_model_parallel_rank()),
           "rank": dist.get_rank(),
           "groups": {a: dist.get_process_group_ranks(getattr(grid, f"get_{a}_parallel_group")())
                      for a in ("pipe", "data", "model")}}
    if "save_at" not in case:
        out["losses"], out["norms"] = _train(engine, data)
        out["params"] = _pieces(engine)
        return out
    losses, norms = _train(engine, data[:case["save_at"]])
    engine.save_checkpoint(case["dir"])
    pp, dp = case["load"]
    fresh = _engine(case, pp, dp, base_seed=SEED + 1000)
    fresh.load_checkpoint(case["dir"])
    more, more_norms = _train(fresh, data[case["save_at"]:])
    g = fresh.grid
    out.update(losses=losses + more, norms=norms + more_norms, params=_pieces(fresh),
               coord=(g.get_stage_id(), g.get_data_parallel_rank(), g.get_model_parallel_rank()))
    return out


def run_3d_cases(cases):
    out = []
    for case in cases:
        out.append(run_3d(case))
        dist.barrier()
    return out
