"""``ZeroEngine.load_checkpoint``: verify, then restore -- resharding when the layout changed.

Same data-parallel size and bucket layout: each rank reads the model file and its own shard file (stage 0
in fp16/bf16: rank 0's, which holds the replicated masters), bit-exact. Otherwise (another world size, another
``reduce_bucket_size``, stage 0 fp32 <-> a partitioned stage) every rank reads all shard files, rebuilds the
full fp32 masters and per-element optimizer states by name (``reshard``) and cuts its own shards of the
current layout. RNG states are restored when this rank has a file of its own; 1-bit error feedback is loaded
per rank on the same world size and resharded from its world-size independent form otherwise.

MoE expert params come from their per-expert files (``experts``) on every path: each rank reads the files
of the experts it holds now, so ``ep_size`` and the world size may change.

Anything missing, truncated, corrupted or not matching the model raises :class:`CheckpointError` naming the
file: never a silent fresh start.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import torch

from ._io import CheckpointError, model_file, optim_file, read_marker, resolve_tag, safe_load
from . import experts, stage3
from .reshard import bucket_full, full_from_direct, full_from_master_shards, master_states_from_full

logger = logging.getLogger("ds_zero")


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        except ImportError:  # pragma: no cover
            pass


def _expert_gis(model: dict) -> set[int]:
    return {int(gi) for gi in (model.get("experts") or {}).get("groups", {})}


def _dense_layout(layout: list[dict], expert_gis: set[int]) -> list[dict]:
    """The buckets of the dense groups (expert buckets' numbering and shapes change with ``ep_size``)."""
    return [{k: v for k, v in b.items() if k != "index"} for b in layout if b["group_index"] not in expert_gis]


def _saved_full(ckpt_dir: str, marker: dict, model: dict, expert_full: dict | None = None) -> dict:
    """The layout-independent form of the saved masters and optimizer states; MoE experts (in their per-expert
    files, not here) from ``expert_full`` (``experts.load_full``: this rank's current experts)."""
    if model["mode"] == "stage3":
        full = stage3.full_from_stage3(ckpt_dir, marker, model)
    elif model["mode"] == "direct":
        skip = set((model.get("experts") or {}).get("names", []))
        full = full_from_direct(model["module"], model["optimizer"], model["group_names"], skip)
    else:
        gis = _expert_gis(model)
        layout = [b for b in model["layout"] if b["group_index"] not in gis]
        sw = layout[0]["shard_world"] if layout else 1
        shards = {}
        for r in range(sw):
            shard = safe_load(ckpt_dir, optim_file(r), marker)
            shards[r] = {"masters": shard["masters"], "optimizer": shard["optimizer"]}
        full = full_from_master_shards(layout, shards, model["group_map"], model["param_groups"], source=ckpt_dir)
    if expert_full is not None:
        _merge(full, expert_full)
    return full


def _merge(full: dict, expert_full: dict) -> None:
    full["params"].update(expert_full["params"])
    full["states"].update(expert_full["states"])
    for gi, sc in expert_full["scalars"].items():
        full["scalars"][gi] = dict(sc)
    full.setdefault("param_scalars", {}).update(expert_full["param_scalars"])


def _current_layout(engine) -> list[dict]:
    return [b.layout() for b in engine.buckets]


def _load_optimizer(engine, sd: dict, source: str) -> None:
    try:
        engine.optimizer.load_state_dict(sd)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{source}: the saved optimizer state does not fit this run's "
                              f"{type(engine.optimizer).__name__} ({type(exc).__name__}: {exc})") from None


#: optimizer classes whose state dicts are interchangeable (torch's keys exp_avg / exp_avg_sq / step)
_ADAM_FAMILY = {"Adam", "AdamW", "FusedAdam", "FusedAdamW", "CPUAdam", "NVMeAdam", "NVMeShardAdam"}


def _check_optimizer_class(engine, saved: str | None, source: str) -> None:
    current = type(engine.optimizer).__name__
    if saved is None or saved == current or {saved, current} <= _ADAM_FAMILY:
        return
    raise CheckpointError(f"{source}: the optimizer state was saved by {saved}, this run uses {current}; "
                          "pass load_optimizer_states=False to load only the weights")


def _scalars(full: dict, gi: int) -> dict:
    # a fresh copy per param: optimizers step their "step" tensors in place, so one shared object would be
    # advanced once per param
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in full["scalars"].get(gi, {}).items()}


def _load_masters_from_full(engine, full: dict, with_states: bool) -> None:
    masters = engine.masters
    by_group: dict[int, list] = {}
    for b in engine.buckets:
        by_group.setdefault(b.group_index, []).append(b)
    sd: dict[str, Any] = {"state": {}, "param_groups": []}
    current = engine.optimizer.state_dict()["param_groups"]
    j = 0
    for gi, p in enumerate(masters.params):
        if p is None:
            continue
        buckets = sorted(by_group[gi], key=lambda b: b.master_offset)
        with torch.no_grad():
            for b in buckets:
                lo, hi = b.shard_range
                masters.shard(b).copy_(bucket_full(b, full["params"], "fp32 master")[lo:hi])
        if with_states:
            st = master_states_from_full(buckets, full)
            if st:
                st.update(_scalars(full, gi))
                sd["state"][j] = st
            hyper = full["param_groups"][gi] if gi < len(full["param_groups"]) and full["param_groups"][gi] else None
            group = dict(hyper) if hyper is not None else {k: v for k, v in current[j].items() if k != "params"}
            group["params"] = [j]
            sd["param_groups"].append(group)
        j += 1
    if with_states:
        _load_optimizer(engine, sd, "the resharded checkpoint")


def _load_direct_from_full(engine, full: dict, with_states: bool) -> None:
    names = {p: n for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for b in engine.buckets:
            for n, p in zip(b.names, b.params):
                if n not in full["params"]:
                    raise CheckpointError(f"the checkpoint has no fp32 master for parameter {n!r}")
                p.data.copy_(full["params"][n].reshape(p.shape))
    if not with_states:
        return
    sd: dict[str, Any] = {"state": {}, "param_groups": []}
    idx = 0
    for gi, group in enumerate(engine.optimizer.param_groups):
        ids = []
        for p in group["params"]:
            n = names.get(p)
            st = dict(full["states"].get(n, {}))
            if st:
                st.update(_scalars(full, gi))
                sd["state"][idx] = st
            ids.append(idx)
            idx += 1
        hyper = full["param_groups"][gi] if gi < len(full["param_groups"]) and full["param_groups"][gi] else None
        g = dict(hyper) if hyper is not None else {k: v for k, v in group.items() if k != "params"}
        g["params"] = ids
        sd["param_groups"].append(g)
    _load_optimizer(engine, sd, "the resharded checkpoint")


def _own_file(own: dict[str, Any] | None, ckpt_dir: str, rank: int) -> dict[str, Any]:
    """This rank's optimizer file, read when the world size is the one saved (what the fast path implies)."""
    if own is None:
        raise CheckpointError(f"{os.path.join(ckpt_dir, optim_file(rank))}: this rank's own file is read only on "
                              "the world size the checkpoint was saved on")
    return own


def _load_compressed(engine, model: dict, own: dict | None, ckpt_dir: str, with_states: bool,
                     marker: dict[str, Any]) -> None:
    """A ds-comm compressed optimizer (stage 0): its state is per rank (error feedback, masks). Same world size:
    this rank's own, bit-exact; another: rank 0's, whose error feedback ds-comm resets (logged), momenta and
    variances being replicated. In fp32 (*direct*) the params came with the module state; in fp16/bf16
    (*masters*) the fp32 masters come from rank 0's file (replicated at stage 0), or from the module's 16-bit
    weights without the optimizer states (DeepSpeed's ``refresh_fp32_params``)."""
    if model["mode"] != engine.mode.name or model["stage"] != 0:
        wanted = "stage-0 fp32" if engine.mode.name == "direct" else "stage-0 fp16/bf16"
        raise CheckpointError(f"{ckpt_dir}: saved in {model['mode']!r} mode (stage {model['stage']}); a compressed "
                              f"optimizer in this precision resumes only from a {wanted} checkpoint")
    if engine.mode.name == "masters":
        if with_states:
            rank0 = own if engine.dp_rank == 0 and own is not None else safe_load(ckpt_dir, optim_file(0), marker)
            with torch.no_grad():
                for p, saved in zip(engine.masters.params, rank0["masters"]):
                    if p is not None:
                        p.data.copy_(saved)
        else:
            engine.refresh_fp32_params()
    if not with_states:
        return
    if own is not None and own.get("optimizer") is not None:
        _load_optimizer(engine, own["optimizer"], os.path.join(ckpt_dir, optim_file(engine.dp_rank)))
    elif model["optimizer"] is not None:
        _load_optimizer(engine, model["optimizer"], os.path.join(ckpt_dir, model_file()))
    else:  # another world size in fp16/bf16: rank 0's per-rank file holds the optimizer state
        _load_optimizer(engine, safe_load(ckpt_dir, optim_file(0), marker)["optimizer"],
                        os.path.join(ckpt_dir, optim_file(0)))
    if engine.mode.name == "masters":
        engine.masters.write_params()


def load_checkpoint(engine, load_dir, tag=None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True):
    """Every rank reads and applies what it needs without collectives, then the ranks agree: a failure on one
    rank raises on every rank (the failing one its own error, the others a CheckpointError naming it), before
    the parameter all-gather of stages 1/2 that would otherwise leave them waiting for it."""
    from .save import agree

    error, result = None, None
    try:
        result = _load_local(engine, load_dir, tag, load_optimizer_states, load_lr_scheduler_states)
    except Exception as exc:  # noqa: BLE001 - re-raised by agree, and named on every other rank
        error = exc
    agree(engine, error, f"load_checkpoint({os.fspath(load_dir) if load_dir is not None else load_dir})")
    if engine.mode.gathers_params_after_step:
        engine.policy.gather_params(engine.buckets)
    return result


def _load_local(engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool):
    load_dir = os.fspath(load_dir)
    tag = resolve_tag(load_dir, tag)
    ckpt_dir = os.path.join(load_dir, tag)
    marker = read_marker(ckpt_dir)
    model = safe_load(ckpt_dir, model_file(), marker)
    if model.get("num_groups") != engine._num_groups:
        raise CheckpointError(f"{os.path.join(ckpt_dir, model_file())}: saved with {model.get('num_groups')} "
                              f"optimizer param groups, this engine has {engine._num_groups}")
    if model["mode"] == "masters":
        saved_names = sorted(n for b in model["layout"] for n in b["names"])
    elif model["mode"] == "stage3":
        saved_names = sorted([n for b in model["layout"] for n in b["names"]]
                             + [n for n, info in model["sharded"].items() if info["group"] is not None])
    else:
        saved_names = sorted(n for g in model["group_names"] for n in g)
    current_names = sorted(n for b in engine.buckets for n in b.names)
    if engine.mode.name == "stage3":
        current_names += [n for n, p in engine.module.named_parameters()
                          if p in engine.policy.sharded_set and p.requires_grad]
    if getattr(engine, "expert_groups", None):  # their names depend on ep_size: checked per expert (experts)
        in_files = set(experts.expert_params(engine))
        current_names = [n for n in current_names if n not in in_files]
    if not set(current_names) <= set(saved_names):
        missing = sorted(set(current_names) - set(saved_names))
        raise CheckpointError(f"{ckpt_dir}: this model's trainable parameters {missing[:5]} are not trained "
                              "parameters in the checkpoint")
    if load_optimizer_states:
        _check_optimizer_class(engine, model.get("optimizer_class"), os.path.join(ckpt_dir, model_file()))
    experts.check_loadable(engine, model, ckpt_dir)
    has_experts = experts.layout(engine) is not None
    # MoE: this rank's experts (its current ones, whatever ep_size saved them) from their per-expert files
    expert_full = experts.load_full(engine, ckpt_dir, marker, model) if has_experts else None
    if engine.mode.name == "stage3":
        _load_stage3(engine, ckpt_dir, marker, model, load_optimizer_states, expert_full)
        return _finish(engine, ckpt_dir, marker, model, load_optimizer_states, load_lr_scheduler_states)
    module_state = model["module"]
    if model["mode"] == "stage3":
        module_state = stage3.module_state_from_stage3(model, _saved_full(ckpt_dir, marker, model),
                                                       engine.precision.dtype)
    _load_module(engine, module_state, expert_full, os.path.join(ckpt_dir, model_file()))

    same_world = model["dp_world_size"] == engine.dp_world_size
    same_mode = model["mode"] == engine.mode.name
    gis = _expert_gis(model)
    # MoE: the dense buckets decide (the experts come from their own files on any layout)
    fast = (same_world and same_mode
            and _dense_layout(model["layout"], gis) == _dense_layout(_current_layout(engine), gis))
    own: dict[str, Any] | None = None
    if same_world:
        own = safe_load(ckpt_dir, optim_file(engine.dp_rank), marker)

    if engine.mode.compressed:
        _load_compressed(engine, model, own, ckpt_dir, load_optimizer_states, marker)
    elif engine.mode.steps_model_params:
        if fast and not has_experts:
            if load_optimizer_states and model["optimizer"] is not None:
                _load_optimizer(engine, model["optimizer"], os.path.join(ckpt_dir, model_file()))
        else:
            _load_direct_from_full(engine, _saved_full(ckpt_dir, marker, model, expert_full), load_optimizer_states)
    else:
        if not load_optimizer_states or not engine.config.zero_optimization.load_from_fp32_weights:
            # masters from the (model-dtype) module weights, as DeepSpeed's refresh_fp32_params
            full = {"params": {n: p.detach().float() for b in engine.buckets for n, p in zip(b.names, b.params)},
                    "states": {}, "scalars": {}, "param_groups": []}
            _load_masters_from_full(engine, full, with_states=False)
            if load_optimizer_states:  # fp32 weights ignored by config, optimizer states still wanted
                states = _saved_full(ckpt_dir, marker, model, expert_full)
                states["params"] = full["params"]
                _load_masters_from_full(engine, states, with_states=True)
        elif fast:
            per_rank = engine.policy.shard_world > 1
            src = _own_file(own, ckpt_dir, engine.dp_rank) if per_rank else safe_load(ckpt_dir, optim_file(0), marker)
            with torch.no_grad():
                for p, saved in zip(engine.masters.params, src["masters"]):
                    if p is not None and saved is not None:  # None: an expert group's (its files, below)
                        p.data.copy_(saved)
            sd = src["optimizer"]
            if expert_full is not None:
                sd = _with_expert_masters(engine, sd, expert_full)
            _load_optimizer(engine, sd, os.path.join(ckpt_dir, optim_file(engine.dp_rank if per_rank else 0)))
        else:
            _load_masters_from_full(engine, _saved_full(ckpt_dir, marker, model, expert_full), with_states=True)
        engine.masters.write_params()  # stages 1/2 all-gather after the ranks agree (load_checkpoint)
    return _finish(engine, ckpt_dir, marker, model, load_optimizer_states, load_lr_scheduler_states)


def _load_module(engine, module_state: dict, expert_full: dict | None, source: str) -> None:
    """The module state (stages 0-2); MoE: it has no expert entries, which come from ``expert_full``."""
    try:
        missing, unexpected = engine.module.load_state_dict(module_state, strict=expert_full is None)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: module state does not fit the model: {exc}") from None
    if expert_full is not None:
        missing = [k for k in missing if k not in expert_full["values"]]
        if missing or unexpected:
            raise CheckpointError(f"{source}: module state does not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        experts.write_values(engine, expert_full)


def _with_expert_masters(engine, sd: dict, expert_full: dict) -> dict:
    """The fast path's optimizer state dict (dense groups' from this rank's file) with the expert groups' masters
    written and their states added, cut from ``expert_full`` for this rank's shards of the current layout."""
    sd = {**sd, "state": dict(sd["state"])}
    live = [gi for gi, p in enumerate(engine.masters.params) if p is not None]
    for j, gi in enumerate(live):
        if gi not in engine.expert_groups:
            continue
        buckets = sorted((b for b in engine.buckets if b.group_index == gi), key=lambda b: b.master_offset)
        with torch.no_grad():
            for b in buckets:
                lo, hi = b.shard_range
                engine.masters.shard(b).copy_(bucket_full(b, expert_full["params"], "fp32 master")[lo:hi])
        st = master_states_from_full(buckets, expert_full)
        if st:
            st.update(_scalars(expert_full, gi))
            sd["state"][j] = st
    return sd


def _load_stage3(engine, ckpt_dir: str, marker: dict, model: dict, with_states: bool,
                 expert_full: dict | None = None) -> None:
    """A stage-3 engine: from a stage-3 checkpoint of the same world size and sharding, each rank reads its own
    rows (``stage3.local_from_stage3``); otherwise every rank reassembles the full form and cuts its own rows
    (any saved stage and world size). Buffers and frozen params from the saved module entries."""
    source = os.path.join(ckpt_dir, model_file())
    full = None
    if model["mode"] == "stage3" and model["dp_world_size"] == engine.dp_world_size:
        full = stage3.local_from_stage3(ckpt_dir, marker, model, engine)
    if full is None:
        full = _saved_full(ckpt_dir, marker, model)
    if expert_full is not None:
        _merge(full, expert_full)
    saved_module = model["module"]
    frozen = dict(full.get("frozen", {}))
    sharded_names = {n for n, p in engine.module.named_parameters() if p in engine.policy.sharded_set}
    for name in sharded_names:
        if name not in frozen and name in saved_module and name not in full["params"]:
            frozen[name] = saved_module[name].float()
    full["frozen"] = frozen
    buffers = dict(engine.module.named_buffers())
    persistent = {n: p for n, p in engine.module.named_parameters() if p not in engine.policy.sharded_set}
    missing = [n for n in list(buffers) + list(persistent) if n not in saved_module and n not in full["params"]]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint has no value for {missing[:5]}")
    for name, value in saved_module.items():
        target = buffers.get(name)
        if target is not None and tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: buffer {name!r} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(target.shape)} in the model")
    stage3.load_full_into_stage3(engine, full, with_states, source)
    with torch.no_grad():
        for name, target in buffers.items():
            if name in saved_module:
                target.copy_(saved_module[name])
        for name, p in persistent.items():  # frozen persistent params (trainable ones came from their masters)
            if not p.requires_grad and name in saved_module:
                p.copy_(saved_module[name])


def _finish(engine, ckpt_dir, marker, model, load_optimizer_states: bool, load_lr_scheduler_states: bool):
    same_world = model["dp_world_size"] == engine.dp_world_size
    own = safe_load(ckpt_dir, optim_file(engine.dp_rank), marker) if same_world else None
    if load_lr_scheduler_states and engine.lr_scheduler is not None and model["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(model["lr_scheduler"])
    if load_optimizer_states:
        engine.precision.load_state_dict(model["precision"])
    counters = model["counters"]
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.micro_steps = counters["micro_steps"]
    engine.skipped_steps = counters["skipped_steps"]
    engine.reducer.zero_grads()
    if own is not None:
        _restore_rng(own["rng"])
        engine.reducer.load_state_dict(own["reducer"], world_size=engine.dp_world_size, rank=engine.dp_rank)
    else:
        logger.warning("ds_zero: resuming %s (saved on %d ranks) on %d ranks: RNG states not restored",
                       ckpt_dir, model["dp_world_size"], engine.dp_world_size)
        if model.get("compression_full") is not None:
            engine.reducer.load_state_dict(model["compression_full"], world_size=engine.dp_world_size,
                                           rank=engine.dp_rank)
    return ckpt_dir, model["client_state"]
