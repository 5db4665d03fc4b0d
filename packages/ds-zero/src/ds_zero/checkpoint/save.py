"""``ZeroEngine.save_checkpoint``: per-rank shards, then a checksummed commit marker, then ``latest``.

Layout of ``save_dir``::

    latest                                            text: the last committed tag (write-temp-then-rename)
    <tag>/mp_rank_00_model_states.pt                  rank 0: module state dict (model dtype), engine
                                                      counters, LR scheduler, loss scaler, client_state,
                                                      bucket layout; stage-0 fp32: the optimizer state;
                                                      1-bit: the world-size independent error feedback
    <tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt every rank: RNG states, its 1-bit residuals, and (ranks
                                                      that own shards) its fp32 master shards and the
                                                      optimizer state over them; with a ds-comm compressed
                                                      optimizer (stage 0) every rank: its optimizer state
    <tag>/layer_<L>_expert_<E>_mp_rank_00_model_states.pt   MoE: global expert E of MoE layer L (its values, fp32
                                                      masters, optimizer states), by the first rank of its
                                                      expert-data-parallel group (``experts``); the files above
                                                      hold no expert values
    <tag>/ds_zero_commit.json                         rank 0, last: world size, stage, each file's size + sha256

Every rank must call it (there are collectives).
"""

from __future__ import annotations

import io
import os
import random
from typing import Any, cast

import torch
import torch.distributed as dist

from . import experts, stage3
from ._io import (FORMAT, LATEST, MARKER, VERSION, CheckpointError, atomic_torch_save, atomic_write_text, check_tag,
                  model_file, optim_file, remove_files, remove_stale_temporaries, write_marker)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        # the legacy tuple (numpy's stubs also allow legacy=False's dict)
        kind, keys, pos, has_gauss, cached = cast(tuple[str, Any, int, int, float], np.random.get_state())
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy comes with ds-optim
        pass
    return state


def _check_client_state(client_state: dict) -> None:
    """Refuse now what ``torch.load(weights_only=True)`` would refuse at load time."""
    buf = io.BytesIO()
    torch.save(client_state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as exc:
        raise TypeError(
            "client_state must hold plain data (tensors, numbers, strings, lists, tuples, dicts): checkpoints are "
            f"loaded with torch.load(weights_only=True), which refuses it ({str(exc).splitlines()[0]})"
        ) from None


def _gather(engine, obj):
    if not engine.distributed or engine.dp_world_size == 1:
        return [obj]
    out = [None] * engine.dp_world_size
    dist.all_gather_object(out, obj, group=engine.process_group)
    return out


def _param_names(engine) -> dict:
    names: dict[torch.nn.Parameter, str] = {}
    for n, p in engine.module.named_parameters():
        names.setdefault(p, n)
    return names


def _module_state(engine) -> dict[str, torch.Tensor]:
    # clones: the params are views of flat buckets, which torch.save would otherwise drag in whole
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def save_checkpoint(engine, save_dir, tag: str | None = None, client_state: dict | None = None) -> str:
    if save_dir is None or (isinstance(save_dir, str) and not save_dir):
        raise ValueError("save_checkpoint: save_dir must be a directory path, got " + repr(save_dir))
    save_dir = os.fspath(save_dir)
    tag = check_tag(f"global_step{engine.global_steps}" if tag is None else tag)
    client_state = {} if client_state is None else client_state
    if not isinstance(client_state, dict):
        raise TypeError(f"client_state must be a dict, got {type(client_state).__name__}")
    _check_client_state(client_state)
    tags = _gather(engine, tag)
    if len(set(tags)) != 1:
        raise CheckpointError(f"save_checkpoint: ranks passed different tags {sorted(set(tags))}")
    ckpt_dir = os.path.join(save_dir, tag)
    rank = engine.dp_rank
    error: BaseException | None = None
    # MoE: the experts this rank writes, gathered over their expert-data-parallel groups (a collective, so before
    # anything that may fail on one rank only)
    expert_records = experts.records(engine) if experts.layout(engine) is not None else {}
    own_files = [optim_file(rank)] + ([model_file(), MARKER] if rank == 0 else []) + sorted(expert_records)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        if rank == 0 and os.path.exists(os.path.join(ckpt_dir, MARKER)):
            # overwriting a committed tag: un-commit it first, so a crash midway leaves it refused, not mixed
            os.unlink(os.path.join(ckpt_dir, MARKER))
        remove_stale_temporaries(ckpt_dir, own_files)  # of an earlier save of this tag that was killed
        if rank == 0:
            remove_stale_temporaries(save_dir, [LATEST])
    except OSError as exc:
        error = exc
    full_compression = engine.reducer.full_state_dict() if hasattr(engine.reducer, "full_state_dict") else None
    agree(engine, error, f"save_checkpoint({ckpt_dir})")  # also the barrier before any shard is written

    try:
        digests = _write_files(engine, ckpt_dir, client_state, full_compression, expert_records)
        error = None
    except Exception as exc:  # noqa: BLE001 - re-raised here, and named on every other rank
        digests, error = {}, exc
    all_digests = _gather(engine, (digests, _describe(error)))  # every rank's files are in place (or not)
    failed = [(r, msg) for r, (_, msg) in enumerate(all_digests) if msg]
    if failed:
        # nothing will commit this directory: free what it holds (a full disk would otherwise stay full and fail
        # every later save, and every restart's, at the same place)
        _discard_uncommitted(engine, save_dir, ckpt_dir, own_files)
        if error is not None:
            raise error
        raise CheckpointError(f"save_checkpoint({ckpt_dir}) failed on rank {failed[0][0]}: {failed[0][1]}; nothing "
                              "was committed")
    error = None
    if rank == 0:
        try:
            files: dict[str, dict[str, Any]] = {}
            for r, (d, _) in enumerate(all_digests):
                for name, info in d.items():
                    if name in files:  # two ranks claimed one expert (inconsistent expert-parallel groups)
                        raise CheckpointError(f"save_checkpoint({ckpt_dir}): ranks {files[name]['rank']} and {r} "
                                              f"both wrote {name}")
                    files[name] = {**info, "rank": r}
            write_marker(ckpt_dir, {
                "format": FORMAT, "version": VERSION, "tag": tag, "stage": engine.stage,
                "dp_world_size": engine.dp_world_size, "dtype": str(engine.precision.dtype).removeprefix("torch."),
                "global_steps": engine.global_steps, "files": files,
            })
            atomic_write_text(os.path.join(save_dir, LATEST), tag + "\n")
        except Exception as exc:  # noqa: BLE001 - re-raised by agree, and named on every other rank
            error = exc
    agree(engine, error, f"save_checkpoint({ckpt_dir}) committing")
    return ckpt_dir


def _discard_uncommitted(engine, save_dir: str, ckpt_dir: str, own_files: list[str]) -> None:
    """Every rank removes its own files of a save that failed somewhere; after all have, rank 0 removes the tag
    directory if that left it empty (``latest`` still names the last committed tag)."""
    remove_files(ckpt_dir, own_files)
    remove_stale_temporaries(ckpt_dir, own_files)
    _gather(engine, None)  # every rank's files are gone
    if engine.dp_rank == 0:
        try:
            os.rmdir(ckpt_dir)
        except OSError:
            pass  # not empty (someone else's files) or already gone: leave it


def _describe(exc) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def agree(engine, error: BaseException | None, what: str) -> None:
    """Collective: every rank learns whether any rank failed; a failing rank re-raises its own error, the others
    raise a :class:`CheckpointError` naming the first failing rank and its error, so no rank is left waiting in
    a later collective for one that has given up."""
    messages = _gather(engine, _describe(error))
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if failed:
        raise CheckpointError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")


def _strip_experts(sd: dict | None, skip: set[int]) -> dict | None:
    """An optimizer state dict without the states of ``skip`` (indices): those are in the per-expert files."""
    if sd is None or not skip:
        return sd
    return {**sd, "state": {i: st for i, st in sd["state"].items() if i not in skip}}


def _write_files(engine, ckpt_dir: str, client_state: dict, full_compression,
                 expert_records: dict[str, dict]) -> dict[str, dict]:
    """This rank's files (rank 0 also the model file, first ranks of expert-data-parallel groups their experts'
    files); returns their sizes and digests. No collectives."""
    rank = engine.dp_rank
    names = _param_names(engine)
    digests: dict[str, dict] = {}
    has_experts = experts.layout(engine) is not None
    expert_names = set(experts.expert_params(engine)) if has_experts else set()
    # what the per-expert files hold is left out of the module state and the optimizer states below
    if engine.mode.steps_model_params:
        flat = [p for g in engine.optimizer.param_groups for p in g["params"]]
        skip = {i for i, p in enumerate(flat) if names.get(p) in expert_names}
    else:
        live = [gi for gi, p in enumerate(engine.masters.params) if p is not None] if engine.mode.name != "stage3" \
            else []
        skip = {j for j, gi in enumerate(live) if gi in getattr(engine, "expert_groups", {})}
    if rank == 0:
        aliases = {}
        canonical: dict[torch.nn.Parameter, str] = {}
        for n, p in engine.module.named_parameters(remove_duplicate=False):
            if p in canonical:
                aliases[n] = canonical[p]
            else:
                canonical[p] = n
        opt_sd = engine.optimizer.state_dict() if engine.mode.name != "stage3" else None
        hyper: list[dict[str, Any] | None]
        if opt_sd is None:  # stage 3
            group_map = [gi for gi, p in enumerate(engine.masters.params) if p is not None]
            hyper = [None] * engine._num_groups
            for j, gi in enumerate(engine._stage3_group_map):
                hyper[gi] = {k: v for k, v in engine.optimizer.param_groups[j].items() if k != "params"}
        elif engine.mode.steps_model_params:
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt_sd["param_groups"]]
            group_map = list(range(len(hyper)))
        else:
            group_map = [gi for gi, p in enumerate(engine.masters.params) if p is not None]
            hyper = [None] * engine._num_groups
            for j, gi in enumerate(group_map):
                hyper[gi] = {k: v for k, v in opt_sd["param_groups"][j].items() if k != "params"}
        model_states = {
            "format": FORMAT, "version": VERSION, "stage": engine.stage, "dp_world_size": engine.dp_world_size,
            "dtype": str(engine.precision.dtype).removeprefix("torch."),
            "mode": engine.mode.name,
            "module": ({k: v for k, v in _module_state(engine).items() if k not in expert_names}
                       if engine.mode.name != "stage3" else None),
            "aliases": aliases,
            "layout": [b.layout() for b in engine.buckets],
            "num_groups": engine._num_groups,
            "group_map": group_map,
            "param_groups": hyper,
            "group_names": ([[names[p] for p in g["params"]] for g in engine.optimizer.param_groups]
                            if engine.mode.steps_model_params else None),
            "optimizer": _strip_experts(opt_sd, skip) if engine.mode.optimizer_state_in_model_file else None,
            "optimizer_class": type(engine.optimizer).__name__,
            "counters": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                         "micro_steps": engine.micro_steps, "skipped_steps": engine.skipped_steps},
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "precision": engine.precision.state_dict(),
            "compression_full": full_compression,
            "client_state": client_state,
            "expert_groups": experts.layout(engine),
            "experts": experts.model_entries(engine) if has_experts else None,
        }
        if engine.mode.name == "stage3":
            model_states.update(stage3.model_entries(engine))
        digests[model_file()] = atomic_torch_save(model_states, os.path.join(ckpt_dir, model_file()))
    owns = engine.mode.name == "masters" and rank < engine.policy.shard_world
    expert_gis = getattr(engine, "expert_groups", {})
    rank_state = {
        "format": FORMAT, "version": VERSION, "rank": rank, "dp_world_size": engine.dp_world_size,
        "rng": rng_state(),
        "reducer": engine.reducer.state_dict(),
        "masters": [None if p is None or gi in expert_gis else p.data.detach().cpu().clone()
                    for gi, p in enumerate(engine.masters.params)] if owns else None,
        # a compressed optimizer's state is per rank (error feedback), so every rank saves its own
        "optimizer": (_strip_experts(engine.optimizer.state_dict(), skip)
                      if engine.mode.optimizer_state_in_rank_file(rank, engine.policy.shard_world) else None),
    }
    if engine.mode.name == "stage3":
        rank_state.update(stage3.rank_entries(engine))
    digests[optim_file(rank)] = atomic_torch_save(rank_state, os.path.join(ckpt_dir, optim_file(rank)))
    for name, record in expert_records.items():
        digests[name] = atomic_torch_save({"format": FORMAT, "version": VERSION, **record},
                                          os.path.join(ckpt_dir, name))
    return digests
