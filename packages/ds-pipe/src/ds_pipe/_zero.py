"""ZeRO stages 1 and 2 for a pipeline stage: optimizer states and reduced gradients partitioned over the
stage's data-parallel group, gradients reduced once per ``train_batch``.

DeepSpeed runs ZeRO-1 only with its pipeline engine and refuses stage 2; here both run with every schedule.
The data-parallel replicas of one stage (same pipe coordinate, same model coordinate) form the stage's data
group. Per param group of the optimizer, this stage's trainable parameters are laid end to end in one flat
buffer, padded to a multiple of the data-parallel size ``N``; rank ``r`` owns elements ``[r*s, (r+1)*s)``
(``s`` = padded / N). What each rank holds:

- an fp32 *master shard* per param group (``s`` elements), which the optimizer -- rebuilt over those shards
  with ds-zero's ``rebuild_optimizer``, the user's hyper-parameters per group -- steps: its states are
  ``1/N`` of the stage's. In a 16-bit run the full fp32 copies the engine made are freed; the module keeps its
  16-bit parameters, ds-zero's 4Ψ + 12Ψ/N;
- the reduced gradient shard (fp32, ``s`` elements) from the step's reduce-scatter to the optimizer step.

One ``step`` after the schedule (which accumulated the micro-batches' gradients in the stage's ``.grad``):
each parameter's gradient, divided by the micro-batch count in its own dtype (as the replicated engine does),
goes into the group's fp32 flat buffer and ``.grad`` is freed; tied weights are summed over their tie group
on their slice of the flat buffer; one reduce-scatter per group over the data group (ds-zero's collectives)
averages the replicas and leaves this rank its shard. fp16 unscales; the global norm sums the shards' squares
over data, pipe (and model, see ``Precision.norm_sq``) ranks, a tied weight counted once; an overflow anywhere
skips the step on every rank. The optimizer steps the masters, and the new shards are all-gathered (in the
parameters' dtype) into every rank's full parameters.

Stage 1 and stage 2 do the same here: torch's ``PipelineStage`` accumulates the micro-batches' gradients in
the parameters' ``.grad`` over the whole schedule (a full 16-bit gradient per rank, as in DeepSpeed's stage 1),
and the reduction happens once, after the last micro-batch (DeepSpeed's stage 2 reduces every micro-batch,
which a pipeline must not: it would multiply the data-parallel traffic by the micro-batch count). Both
partition the reduced gradients and the optimizer states.

The flat partition needs an optimizer whose update is elementwise (SGD, Adam, AdamW, Adagrad, RMSprop, ...);
LAMB/LARS-type trust ratios per tensor would see a shard of several tensors (the same limit as DeepSpeed's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ds_zero.components import bind_scheduler, materialize_optimizer, rebuild_optimizer
from ds_zero.components import collectives as _comm

from ._precision import local

__all__ = ["PipeZero"]


class _Layout:
    """One optimizer param group's flat layout: parameter indices (into ``Precision.module_params``),
    element offsets, the padded size and this rank's shard ``[lo, hi)``."""

    def __init__(self, indices: list[int], numels: list[int], world: int, rank: int):
        self.indices = indices
        self.offsets = [0]
        for n in numels:
            self.offsets.append(self.offsets[-1] + n)
        total = self.offsets[-1]
        self.shard = max(1, math.ceil(total / world))
        self.padded = self.shard * world
        self.lo, self.hi = rank * self.shard, (rank + 1) * self.shard

    def segments(self):
        """``(position in group, param index, param start, param end)`` in flat coordinates."""
        for k, i in enumerate(self.indices):
            yield k, i, self.offsets[k], self.offsets[k + 1]

    def mine(self, start: int, end: int) -> tuple[int, int] | None:
        """The part ``[a, b)`` of ``[start, end)`` in this rank's shard, or None."""
        a, b = max(start, self.lo), min(end, self.hi)
        return (a, b) if a < b else None


class PipeZero:
    """ZeRO-1/2 for one stage (see the module docstring). Replaces the replicated path of
    :class:`~ds_pipe._precision.Precision` (``grads_to_masters`` .. ``masters_to_params``) in the engine."""

    def __init__(self, stage: int, precision: Any, optimizer: Any, lr_scheduler: Any, grid: Any,
                 device: torch.device):
        self.stage, self.precision, self.grid, self.device = stage, precision, grid, device
        self.group = grid.get_data_parallel_group()
        self.world = grid.get_data_parallel_world_size()
        self.rank = grid.get_data_parallel_rank()
        params = precision.module_params          # what the module computes with (16-bit or fp32)
        originals = precision.opt_params          # the fp32 values (the same tensors in an fp32 run)
        self.names = list(precision.names)
        template = materialize_optimizer(optimizer, list(originals), template_only=True)
        index_of = {id(p): i for i, p in enumerate(originals)}
        self.layouts: list[_Layout] = []
        self._group_of_layout: list[int] = []     # the template param group each layout came from
        seen: set[int] = set()
        for gi, group in enumerate(template.param_groups):
            indices = []
            for p in group["params"]:
                if id(p) not in index_of:
                    raise ValueError(f"ZeRO stage {stage}: the optimizer holds a tensor that is not one of this "
                                     f"pipeline stage's trainable parameters; build it over model.parameters()")
                if id(p) in seen:
                    raise ValueError(f"ZeRO stage {stage}: parameter {self.names[index_of[id(p)]]!r} is in two "
                                     f"optimizer param groups")
                seen.add(id(p))
                indices.append(index_of[id(p)])
            if indices:
                self.layouts.append(_Layout(indices, [local(params[i]).numel() for i in indices], self.world,
                                             self.rank))
                self._group_of_layout.append(gi)
        self.masters: list[nn.Parameter] = []
        with torch.no_grad():
            for lay in self.layouts:
                master = torch.zeros(lay.shard, dtype=torch.float32, device=device)
                for _, i, start, end in lay.segments():
                    part = lay.mine(start, end)
                    if part:
                        a, b = part
                        master[a - lay.lo:b - lay.lo].copy_(local(originals[i]).detach().reshape(-1)[a - start:b - start])
                self.masters.append(nn.Parameter(master))
        # one group per non-empty template group, with its hyper-parameters (an empty group is dropped, which
        # a constructed LR scheduler then refuses by name in bind_scheduler)
        per_group: list[list[nn.Parameter]] = [[] for _ in template.param_groups]
        for gi, m in zip(self._group_of_layout, self.masters):
            per_group[gi] = [m]
        self.optimizer = rebuild_optimizer(template, per_group) if self.masters else None
        if self.optimizer is not None and lr_scheduler is not None:
            self.lr_scheduler = bind_scheduler(lr_scheduler, template, self.optimizer)
        else:
            self.lr_scheduler = lr_scheduler(self.optimizer) if callable(lr_scheduler) and not hasattr(
                lr_scheduler, "step") and self.optimizer is not None else lr_scheduler
        self.params = params
        if precision.mixed:
            # the full fp32 copies are replaced by the shards: free them (the user's optimizer object, if one
            # was passed, still names them; it is not stepped)
            for m in originals:
                m.data = torch.empty(0, dtype=torch.float32, device=m.device)
                m.grad = None
        # tied weights: param index -> (tie group, counted in the norm here)
        self.tied = {i: (group, counts) for i, group, counts in precision.tied}
        self._shard_grads: list[torch.Tensor] = []

    # ----- the step
    def reduce(self, n_micro: int) -> list[torch.Tensor]:
        """Flat fp32 gradients -> tied sums -> reduce-scatter: this rank's averaged gradient shard per group."""
        shards = []
        for lay in self.layouts:
            flat = torch.zeros(lay.padded, dtype=torch.float32, device=self.device)
            for _, i, start, end in lay.segments():
                p = self.params[i]
                if p.grad is not None:
                    if n_micro != 1:
                        p.grad.div_(n_micro)  # in the parameter's dtype, as the replicated path does
                    flat[start:end].copy_(local(p.grad).reshape(-1))
                    p.grad = None
            shards.append(flat)
        # tied weights: in Precision.tied's order, which every rank of a tie group shares
        for i, _group, _counts in self.precision.tied:
            for lay, flat in zip(self.layouts, shards):
                if i in lay.indices:
                    k = lay.indices.index(i)
                    dist.all_reduce(flat[lay.offsets[k]:lay.offsets[k + 1]], group=self.tied[i][0])
        out = []
        for lay, flat in zip(self.layouts, shards):
            shard = torch.empty(lay.shard, dtype=torch.float32, device=self.device)
            _comm.wait(_comm.reduce_scatter(shard, flat, self.group))
            if self.world > 1:
                shard.div_(self.world)
            out.append(shard)
        return out

    def _norm_sq(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """This rank's share of the squared global norm: its shard, less the tied copies not counted here, and
        (model axis) a replicated parameter counted on model rank 0 only."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        model_rank = self.grid.get_model_parallel_rank()
        for lay, g in zip(self.layouts, grads):
            for _, i, start, end in lay.segments():
                part = lay.mine(start, end)
                if not part:
                    continue
                if i in self.tied and not self.tied[i][1]:
                    continue
                if model_rank != 0 and not self.precision.is_model_parallel(i):
                    continue
                a, b = part
                sq += g[a - lay.lo:b - lay.lo].pow(2).sum()
        return sq

    def step(self, n_micro: int) -> bool:
        """Reduce, unscale, clip, step, gather. Returns True when the step was skipped (fp16 overflow)."""
        prec = self.precision
        grads = self.reduce(n_micro)
        if prec.scaler is not None and grads:
            torch._foreach_div_(grads, prec.scaler.cur_scale)
        if prec.scaler is not None or prec.clip > 0:
            sq = self._norm_sq(grads)
            dist.all_reduce(sq)  # every rank: shards over data, stages over pipe, pieces over model
            if prec.scaler is not None and not bool(torch.isfinite(sq)):
                prec.norm = float("inf")
                prec.scaler.update_scale(True)
                prec.skipped_steps += 1
                return True
            prec.norm = float(sq.sqrt())
            if prec.clip > 0 and grads:
                coef = prec.clip / (prec.norm + 1e-6)
                if coef < 1:
                    torch._foreach_mul_(grads, coef)
            if prec.scaler is not None:
                prec.scaler.update_scale(False)
        if self.optimizer is not None:
            self._shard_grads = grads  # readable until the next step (tests compare them)
            for m, g in zip(self.masters, grads):
                m.grad = g
            self.optimizer.step()
            for m in self.masters:
                m.grad = None
        self.gather()
        return False

    @torch.no_grad()
    def gather(self) -> None:
        """Every rank's full parameters from the master shards (all-gather in the parameters' dtype)."""
        for lay, master in zip(self.layouts, self.masters):
            dtype = self.params[lay.indices[0]].dtype
            flat = torch.empty(lay.padded, dtype=dtype, device=self.device)
            _comm.wait(_comm.all_gather(flat, master.detach().to(dtype), self.group))
            for _, i, start, end in lay.segments():
                dst = local(self.params[i])
                dst.copy_(flat[start:end].view_as(dst))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # ----- checkpoints: per parameter name, this rank's pieces (loaders re-assemble them)
    def _state_pieces(self, state: dict[str, Any], lay: _Layout) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for _, i, start, end in lay.segments():
            part = lay.mine(start, end)
            if not part:
                continue
            a, b = part
            out[self.names[i]] = {k: (v[a - lay.lo:b - lay.lo].detach().cpu().clone()
                                      if torch.is_tensor(v) and v.dim() == 1 and v.numel() == lay.shard
                                      else v) for k, v in state.items()}
        return out

    def named_state(self) -> dict[str, Any] | None:
        """The optimizer state as this rank's pieces of each parameter, keyed by name, with the ranges and
        shapes that :func:`merge_zero_pieces` needs."""
        if self.optimizer is None:
            return None
        sd = self.optimizer.state_dict()
        state: dict[str, Any] = {}
        ranges: dict[str, list[int]] = {}
        shapes: dict[str, list[int]] = {}
        groups = []
        for j, (lay, g) in enumerate(zip(self.layouts, sd["param_groups"])):
            state.update(self._state_pieces(sd["state"].get(g["params"][0], {}), lay))
            for _, i, start, end in lay.segments():
                shapes[self.names[i]] = list(local(self.params[i]).shape)
                part = lay.mine(start, end)
                if part:
                    ranges[self.names[i]] = [part[0] - start, part[1] - start]
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [self.names[i] for i in lay.indices]})
        return {"state": state, "param_groups": groups, "zero_ranges": ranges, "zero_shapes": shapes}

    def master_pieces(self) -> dict[str, Any] | None:
        """16-bit runs: this rank's fp32 master pieces per name (fp32 runs: the layer files are the masters)."""
        if not self.precision.mixed:
            return None
        out: dict[str, Any] = {"zero_ranges": {}, "pieces": {}, "zero_shapes": {}}
        for lay, master in zip(self.layouts, self.masters):
            for _, i, start, end in lay.segments():
                out["zero_shapes"][self.names[i]] = list(local(self.params[i]).shape)
                part = lay.mine(start, end)
                if part:
                    a, b = part
                    out["pieces"][self.names[i]] = master.detach()[a - lay.lo:b - lay.lo].cpu().clone()
                    out["zero_ranges"][self.names[i]] = [a - start, b - start]
        return out

    @torch.no_grad()
    def load_masters(self, masters: dict[str, torch.Tensor] | None) -> None:
        """The shards from whole per-name fp32 masters (a 16-bit checkpoint's) or, without them, from the
        module's loaded weights; then every rank's parameters from the shards."""
        for lay, master in zip(self.layouts, self.masters):
            for _, i, start, end in lay.segments():
                part = lay.mine(start, end)
                if not part:
                    continue
                a, b = part
                name = self.names[i]
                src = masters[name] if masters is not None and name in masters else local(self.params[i])
                master.data[a - lay.lo:b - lay.lo].copy_(src.reshape(-1)[a - start:b - start].float())
        self.gather()

    def load_named_state(self, state: dict[str, Any], group_of: dict[str, dict], path: str,
                         error: type[Exception]) -> None:
        """Whole per-name optimizer states (any layout's, after :func:`merge_zero_pieces`) -> this rank's flat
        shard states, loaded through the optimizer's own ``load_state_dict``."""
        if self.optimizer is None:
            return
        out_state, out_groups = {}, []
        for j, (lay, group) in enumerate(zip(self.layouts, self.optimizer.param_groups)):
            names = [self.names[i] for i in lay.indices]
            missing = [n for n in names if n not in group_of]
            if missing:
                raise error(f"{path}: the saved optimizer has no parameter {missing[0]!r}")
            flat: dict[str, Any] = {}
            for _, i, start, end in lay.segments():
                s = state.get(self.names[i])
                if s is None:
                    continue
                for k, v in s.items():
                    # a per-element state has the param's elements (a 0-dim param's is 0-dim too: a size test,
                    # not v.dim(), tells it from a per-tensor scalar); "step" is per tensor whatever its size
                    if k != "step" and torch.is_tensor(v) and v.numel() == end - start:
                        if k not in flat:
                            flat[k] = torch.zeros(lay.shard, dtype=v.dtype)
                        part = lay.mine(start, end)
                        if part:
                            a, b = part
                            flat[k][a - lay.lo:b - lay.lo].copy_(v.reshape(-1)[a - start:b - start])
                    elif k not in flat:
                        flat[k] = v  # a per-tensor scalar ("step"): the same for every parameter
            if flat:
                out_state[j] = flat
            hyper = {k: v for k, v in group_of[names[0]].items() if k != "params"}
            out_groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": [j]})
        self.optimizer.load_state_dict({"state": out_state, "param_groups": out_groups})


def merge_zero_pieces(files: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Whole per-name tensors from every data-parallel rank's file of one stage (ZeRO-saved): ``key`` is
    ``"optimizer"`` (returns ``{"state", "param_groups"}`` in the replicated format) or ``"master"``."""
    parts = [f.get(key) for f in files]
    if all(p is None for p in parts):
        return None
    shapes: dict[str, list[int]] = {}
    if key == "master":
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for m in parts:
            if m is None:
                continue
            for name, t in m.get("pieces", {}).items():
                pieces.setdefault(name, []).append((m["zero_ranges"][name][0], t))
                shapes[name] = m["zero_shapes"][name]
        return {n: torch.cat([t for _, t in sorted(ps, key=lambda x: x[0])]).view(shapes[n])
                for n, ps in pieces.items()}
    by_name: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for p in parts:
        if p is None:
            continue
        shapes.update(p["zero_shapes"])
        for name, s in p["state"].items():
            by_name.setdefault(name, []).append((p["zero_ranges"][name][0], s))
    state: dict[str, Any] = {}
    for name, ps in by_name.items():
        ps.sort(key=lambda x: x[0])
        numel = math.prod(shapes[name])
        whole: dict[str, Any] = {}
        for k, v in ps[0][1].items():
            if k != "step" and torch.is_tensor(v) and v.dim() == 1 and sum(s[k].numel() for _, s in ps) == numel:
                whole[k] = torch.cat([s[k] for _, s in ps]).view(shapes[name])
            else:
                whole[k] = v
        state[name] = whole
    first = next(p for p in parts if p is not None)
    return {"state": state, "param_groups": first["param_groups"]}
