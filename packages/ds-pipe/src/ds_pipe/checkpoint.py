"""Pipeline checkpoints: DeepSpeed's per-layer files, so a run resumes on another pipeline or data layout.

Layout of ``save_dir``::

    latest                                          text: the last complete tag (written to a temporary, renamed)
    <tag>/layer_{L:02d}-model_{M:02d}-model_states.pt layer L's own ``state_dict()`` (keys relative to the layer),
                                                    written by data-parallel rank 0 of the stage owning L; a tied
                                                    module once, as the layer file of its key's first position
    <tag>/mp_rank_{S:02d}_model_states.pt           per stage S (dp rank 0): the layout it was saved under
                                                    (stages, partition, layer class names, dp size), the engine's
                                                    counters and the ``client_state``
    <tag>/zero_pp_rank_{D}_mp_rank_{S:02d}_optim_states.pt
                                                    per (stage S, dp rank D): the optimizer state keyed by
                                                    parameter *name* (``"3.up.weight"``, ``"tied_modules.embed.
                                                    weight"``: the global layer index, not the stage's position),
                                                    its param groups' hyper-parameters with the names they hold,
                                                    and the LR scheduler's state

Names are DeepSpeed's: the tensor-parallel rank is the ``model_MM`` part of a layer file, and the ``mp_rank`` of
a stage or optimizer file numbers pipe x model ranks (``stage * model_size + model_rank``: the stage itself
without tensor parallelism). With tensor parallelism each model rank writes its own pieces; a checkpoint loads
into a run of the same tensor-parallel size (any pipeline / data-parallel layout).

Loading maps by the global layer index, so any stage count works for the weights; the optimizer state is
re-assembled per parameter name from the files of the saved stages that held this rank's layers (data-parallel
rank ``d`` reads the saved rank ``d``, or rank 0 when the saved run had fewer: a non-ZeRO optimizer state is the
same on every replica), so it works for any optimizer whose state is per parameter (SGD, Adam, ...), across
stage counts and data-parallel sizes. With ZeRO (``zero_optimization.stage`` 1/2) each data-parallel rank
writes its pieces of each parameter's state and fp32 master (with their element ranges); a loader reads every
saved rank's file of a stage and re-assembles whole per-name tensors, so ZeRO and replicated runs load each
other's checkpoints on any layout. The LR scheduler's state comes from the saved stage that held this
stage's first layer.

Atomic: every rank writes into ``<save_dir>/.<tag>.tmp``; only when every rank reports success does rank 0
rename it to ``<tag>`` and then replace ``latest``; a failure on any rank removes the temporary on every
rank's behalf and raises on all of them, leaving ``latest`` and the earlier tags as they were. ``save_dir``
must be one directory seen by every rank (a shared file system on several nodes).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from torch.distributed.tensor import DTensor

from . import _zero3_ckpt
from ._precision import local
from .module import LayerSpec, TiedLayerSpec, _layer_name

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "consolidate_checkpoint", "layer_file",
           "stage_file", "optim_file"]

logger = logging.getLogger("ds_pipe")
FORMAT = "ds_pipe.checkpoint.v1"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A pipeline checkpoint could not be saved or does not fit the module it is loaded into."""


def layer_file(idx: int, model_rank: int = 0) -> str:
    return f"layer_{idx:02d}-model_{model_rank:02d}-model_states.pt"


def _mp(stage: int, model_rank: int, model_size: int) -> int:
    """DeepSpeed's ``mp_rank`` of a pipeline checkpoint: pipe x model ranks numbered model-fastest (the stage
    itself without tensor parallelism)."""
    return stage * model_size + model_rank


def _model(engine) -> tuple[int, int]:
    return engine.grid.get_model_parallel_rank(), engine.grid.get_model_parallel_world_size()


def _to_file(v: torch.Tensor) -> torch.Tensor:
    # a DTensor (parallelize_module) is saved as this rank's piece: the file is per model rank
    return local(v).detach().cpu().clone()


def _load_layer(layer: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """``load_state_dict`` (strict); a layer with DTensor parameters gets the saved pieces copied into its
    local shards (torch refuses to copy a plain tensor into a DTensor)."""
    own = layer.state_dict()
    if not any(isinstance(v, DTensor) for v in own.values()):
        layer.load_state_dict(state, strict=True)
        return
    if set(own) != set(state):
        raise RuntimeError(f"keys differ: missing {sorted(set(own) - set(state))}, unexpected "
                           f"{sorted(set(state) - set(own))}")
    for k, v in own.items():
        dst = local(v)
        if isinstance(v, DTensor) and dst.shape != state[k].shape and v.shape == state[k].shape:
            dst.copy_(_zero3_ckpt.chunk_of(state[k], v))  # a whole tensor (ZeRO-3's files): this rank's chunk
            continue
        if dst.shape != state[k].shape:
            raise RuntimeError(f"{k}: saved piece {tuple(state[k].shape)}, this rank's {tuple(dst.shape)}")
        dst.copy_(state[k])


def stage_file(stage: int) -> str:
    return f"mp_rank_{stage:02d}_model_states.pt"


def optim_file(stage: int, dp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt"


def _load(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def _agree(error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed (one scalar all-reduce, also a barrier); the failing rank
    re-raises its own error, the others raise naming it, so no rank goes on to wait in a collective."""
    # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    failed = torch.tensor([dist.get_rank() + 1 if error is not None else 0], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise CheckpointError(f"{what} failed on rank {failed.item() - 1} (its own error says why); rank "
                              f"{dist.get_rank()} stops too")


def _check_client_state(client_state: Any) -> None:
    """Refuse now what ``torch.load(weights_only=True)`` would refuse at load time."""
    if not isinstance(client_state, dict):
        raise TypeError(f"client_state must be a dict, got {type(client_state).__name__}")
    buf = io.BytesIO()
    torch.save(client_state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the reason
        raise TypeError("client_state must hold plain data (tensors, numbers, strings, lists, dicts): checkpoints "
                        f"are loaded with torch.load(weights_only=True), which refuses it "
                        f"({str(exc).splitlines()[0]})") from None


def _check_tag(tag: Any) -> str:
    tag = str(tag)
    if not tag or tag.startswith(".") or os.sep in tag or (os.altsep and os.altsep in tag) or tag == LATEST:
        raise ValueError(f"checkpoint tag {tag!r}: use a plain directory name (not empty, no path separator, not "
                         f"starting with '.', not {LATEST!r})")
    return tag


def _tie_first_positions(specs: list[Any]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if isinstance(spec, TiedLayerSpec):
            first.setdefault(spec.key, i)
    return first


def _local_layers(module) -> dict[int, torch.nn.Module]:
    """This stage's layers that have state, by global index; a tied module under its key's first position
    (which may belong to another stage: the caller decides who writes)."""
    first = _tie_first_positions(module._layer_specs)
    out: dict[int, torch.nn.Module] = {}
    for idx in module.stage_layers():
        spec = module._layer_specs[idx]
        if isinstance(spec, TiedLayerSpec):
            out[first[spec.key]] = module.tied_modules[spec.key]
        elif isinstance(spec, (LayerSpec, torch.nn.Module)):
            out[idx] = module._modules[str(idx)]
    return {i: m for i, m in out.items() if m.state_dict()}


def _optimizer_by_name(engine) -> dict[str, Any] | None:
    if engine.optimizer is None:
        return None
    names = engine.optimizer_param_names()
    sd = engine.optimizer.state_dict()
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    index_to_name = {i: names[id(p)] for i, p in enumerate(params)}
    groups = []
    for g in sd["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [index_to_name[i] for i in g["params"]]})
    return {"state": {index_to_name[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def _own_files(engine, client_state: dict) -> list[tuple[str, Any]]:
    """(file name, object) this rank writes."""
    module = engine.module
    dp_rank = engine.grid.get_data_parallel_rank()
    stage = engine.stage_id
    model_rank, model_size = _model(engine)
    mp = _mp(stage, model_rank, model_size)
    files: list[tuple[str, Any]] = []
    zero3 = getattr(engine, "zero3", False)
    if dp_rank == 0 or zero3:  # one writer per (stage, model rank); ZeRO-3: every replica gathers the layers
        mine = set(module.stage_layers())
        for idx, layer in _local_layers(module).items():
            if idx in mine:  # a tied key's file is written by the stage of its first position only
                state = {k: _zero3_ckpt.whole(v).detach().cpu().clone() if zero3 else _to_file(v)
                         for k, v in layer.state_dict().items()}
                if dp_rank == 0:
                    files.append((layer_file(idx, model_rank), state))
    if dp_rank == 0:
        files.append((stage_file(mp), {
            "format": FORMAT, "stage": stage, "num_stages": engine.num_stages, "parts": list(module.parts),
            "virtual_stages": module.virtual_stages, "virtual_stage_style": module.virtual_stage_style,
            "layer_names": [_layer_name(s) for s in module._layer_specs], "dp_world_size": engine.dp_world_size,
            "model_parallel_size": model_size,
            "global_steps": engine.global_steps, "client_state": client_state,
            "tied_first": {i: k for k, i in _tie_first_positions(module._layer_specs).items()},
            "precision": engine.precision_state(), "ds_pipe_version": _version()}))
    zero = getattr(engine, "zero", None)
    optim = (zero.named_state() if zero is not None else _zero3_ckpt.named_state(engine) if zero3
             else _optimizer_by_name(engine))
    files.append((optim_file(mp, dp_rank), {
        "format": FORMAT, "optimizer": optim, "master": engine.master_state(), "zero": zero is not None or zero3,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}))
    return files


def _version() -> str:
    from ._version import __version__
    return __version__


def save_checkpoint(engine, save_dir, tag: str | None = None, client_state: dict | None = None) -> str:
    """Every rank calls it. Returns the checkpoint's directory."""
    if save_dir is None or (isinstance(save_dir, str) and not save_dir):
        raise ValueError(f"save_checkpoint: save_dir must be a directory path, got {save_dir!r}")
    save_dir = os.fspath(save_dir)
    tag = _check_tag(f"global_step{engine.global_steps}" if tag is None else tag)
    client_state = {} if client_state is None else client_state
    error: BaseException | None = None
    try:
        _check_client_state(client_state)
    except Exception as exc:  # noqa: BLE001 - raised on this rank by _agree, named on the others
        error = exc
    _agree(error, "save_checkpoint's client_state check")
    tags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(tags, tag)
    if len(set(tags)) != 1:
        raise CheckpointError(f"save_checkpoint: ranks passed different tags {sorted(set(tags))}")
    tmp, final = os.path.join(save_dir, f".{tag}.tmp"), os.path.join(save_dir, tag)
    rank = dist.get_rank()
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # of an earlier save of this tag that was killed
            os.makedirs(tmp)
        except OSError as exc:
            error = exc
    _agree(error, f"save_checkpoint: making {tmp}")
    try:
        for name, obj in _own_files(engine, client_state):
            torch.save(obj, os.path.join(tmp, name))
    except Exception as exc:  # noqa: BLE001 - raised on this rank by _agree, named on the others
        error = exc
    try:
        _agree(error, f"save_checkpoint({final})")
    except BaseException:
        if rank == 0:  # nothing publishes this directory: free it
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        try:
            if os.path.exists(final):  # re-saving a tag: the new one replaces it whole
                old = os.path.join(save_dir, f".{tag}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            latest_tmp = os.path.join(save_dir, f".{LATEST}.tmp")
            with open(latest_tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(latest_tmp, os.path.join(save_dir, LATEST))
        except OSError as exc:
            error = exc
    _agree(error, f"save_checkpoint: publishing {final}")
    return final


def _resolve(load_dir, tag) -> str | None:
    load_dir = os.fspath(load_dir)
    if tag is None:
        latest = os.path.join(load_dir, LATEST)
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    return os.path.join(load_dir, _check_tag(tag))


def load_checkpoint(engine, load_dir, tag: str | None = None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True):
    """Every rank calls it. ``(path, client_state)``; ``(None, None)`` with a warning when ``tag`` is None and
    ``load_dir`` has no ``latest`` file (DeepSpeed's "resume if there is one")."""
    path = _resolve(load_dir, tag)
    if path is None:
        logger.warning("ds_pipe: no '%s' file in %s: nothing loaded", LATEST, os.fspath(load_dir))
        return None, None
    error: BaseException | None = None
    client_state = None
    try:
        client_state = _load_into(engine, path, load_optimizer_states, load_lr_scheduler_states)
    except Exception as exc:  # noqa: BLE001 - raised on this rank by _agree, named on the others
        error = exc
    _agree(error, f"load_checkpoint({path})")
    return path, client_state


def _saved_layout(path: str, module) -> dict[str, Any]:
    meta = _load(os.path.join(path, stage_file(0)))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ds-pipe checkpoint (format {meta.get('format')!r})")
    names = [_layer_name(s) for s in module._layer_specs]
    if meta["layer_names"] != names:
        diff = next((i for i, (a, b) in enumerate(zip(meta["layer_names"], names)) if a != b), None)
        where = (f"layer {diff} was {meta['layer_names'][diff]} and is {names[diff]}" if diff is not None else
                 f"{len(meta['layer_names'])} layers saved, {len(names)} now")
        raise CheckpointError(f"{path} was saved from another layer list: {where}")
    return meta


def _load_into(engine, path: str, load_optimizer_states: bool, load_lr_scheduler_states: bool) -> Any:
    module = engine.module
    meta = _saved_layout(path, module)
    model_rank, model_size = _model(engine)
    if meta.get("model_parallel_size", 1) != model_size:
        raise CheckpointError(f"{path} was saved with {meta.get('model_parallel_size', 1)} tensor-parallel ranks, "
                              f"this run has {model_size}: re-splitting tensor-parallel layers is not built (the "
                              f"pipeline and data-parallel layouts may change)")
    with torch.no_grad():
        for idx, layer in _local_layers(module).items():
            state = _load(os.path.join(path, layer_file(idx, model_rank)))
            try:
                _load_layer(layer, state, layer_file(idx, model_rank))
            except RuntimeError as exc:
                raise CheckpointError(f"{layer_file(idx, model_rank)} does not fit layer {idx}: {exc}") from None
    saved_parts, saved_dp = meta["parts"], meta["dp_world_size"]
    dp_rank = engine.grid.get_data_parallel_rank()
    source_dp = dp_rank if dp_rank < saved_dp else 0

    def saved_stage(idx: int) -> int:  # the saved run's pipeline rank of layer idx
        chunk = next(c for c in range(len(saved_parts) - 1) if saved_parts[c] <= idx < saved_parts[c + 1])
        j, k = chunk % meta["num_stages"], chunk // meta["num_stages"]
        v_shaped = meta.get("virtual_stage_style", "loop") == "v" and k % 2
        return meta["num_stages"] - 1 - j if v_shaped else j

    # the saved stages holding this stage's layers (a tied key: the stage of its first position)
    first = _tie_first_positions(module._layer_specs)
    sources = []
    for idx in module.stage_layers():
        spec = module._layer_specs[idx]
        s = saved_stage(first[spec.key] if isinstance(spec, TiedLayerSpec) else idx)
        if s not in sources:
            sources.append(s)
    first_mp = _mp(sources[0], model_rank, model_size)
    stage_meta = meta if first_mp == 0 else _load(os.path.join(path, stage_file(first_mp)))
    files = {s: _optim_states(path, _mp(s, model_rank, model_size), source_dp, saved_dp) for s in sources}
    engine.global_steps = int(stage_meta["global_steps"])
    engine.load_precision_state(stage_meta.get("precision"))
    engine.load_master_state(_merge_masters([files[s].get("master") for s in sources]))
    if load_optimizer_states and engine.optimizer is not None:
        _load_optimizer(engine, [files[s]["optimizer"] for s in sources], path)
    if load_lr_scheduler_states and engine.lr_scheduler is not None:
        sched = files[sources[0]]["lr_scheduler"]
        if sched is None:
            raise CheckpointError(f"{path} holds no LR scheduler state (the saved run had none); pass "
                                  f"load_lr_scheduler_states=False")
        engine.lr_scheduler.load_state_dict(sched)
    return stage_meta["client_state"]


def _optim_states(path: str, stage: int, dp_rank: int, saved_dp: int) -> dict[str, Any]:
    # ``stage``: the file's mp index (the stage, with tensor parallelism stage x model size + model rank)
    """The saved stage's optimizer file in the replicated format: a ZeRO run's pieces (one file per saved
    data-parallel rank) are re-assembled into whole per-name tensors first."""
    first = _load(os.path.join(path, optim_file(stage, dp_rank)))
    if not first.get("zero"):
        return first
    from ._zero import merge_zero_pieces

    every = [first if d == dp_rank else _load(os.path.join(path, optim_file(stage, d))) for d in range(saved_dp)]
    return {**first, "optimizer": merge_zero_pieces(every, "optimizer"), "master": merge_zero_pieces(every, "master")}


def _merge_masters(parts: list[Any]) -> dict[str, torch.Tensor] | None:
    if all(p is None for p in parts):
        return None
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        merged.update(p or {})
    return merged


def _load_optimizer(engine, saved: list[dict | None], path: str) -> None:
    """Re-assemble the optimizer state per parameter name and load it through the optimizer's own
    ``load_state_dict`` (which moves the tensors to each parameter's device)."""
    present = [s for s in saved if s is not None]
    if len(present) != len(saved):
        raise CheckpointError(f"{path} holds no optimizer state for this stage's layers (the saved run had none); "
                              f"pass load_optimizer_states=False")
    state: dict[str, Any] = {}
    group_of: dict[str, dict] = {}
    for s in present:
        state.update(s["state"])
        for g in s["param_groups"]:
            for n in g["params"]:
                group_of.setdefault(n, g)
    if getattr(engine, "zero", None) is not None:
        engine.zero.load_named_state(state, group_of, path, CheckpointError)
        return
    if getattr(engine, "zero3", False):
        _zero3_ckpt.load_named_state(engine, state, group_of, path, CheckpointError)
        return
    names = engine.optimizer_param_names()
    out_state, out_groups, i = {}, [], 0
    for group in engine.optimizer.param_groups:
        ids = []
        group_names = [names[id(p)] for p in group["params"]]
        missing = [n for n in group_names if n not in group_of]
        if missing:
            raise CheckpointError(f"{path}: the saved optimizer has no parameter {missing[0]!r}")
        hyper = {k: v for k, v in group_of[group_names[0]].items() if k != "params"} if group_names else {}
        for n in group_names:
            if n in state:
                out_state[i] = state[n]
            ids.append(i)
            i += 1
        out_groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": ids})
    engine.optimizer.load_state_dict({"state": out_state, "param_groups": out_groups})


def consolidate_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """One state dict from a pipeline checkpoint directory, in ``PipelineModule``'s names (``"3.up.weight"``,
    ``"tied_modules.<key>.weight"``): what a one-stage module's ``load_state_dict`` takes. No process group
    needed."""
    path = os.fspath(path)
    meta = _load(os.path.join(path, stage_file(0)))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ds-pipe checkpoint (format {meta.get('format')!r})")
    if meta.get("model_parallel_size", 1) != 1:
        raise CheckpointError(f"{path} holds tensor-parallel pieces ({meta['model_parallel_size']} model ranks): "
                              f"consolidating them needs each layer's split dimension, which the checkpoint does "
                              f"not record; not built")
    tied_at: dict[int, str] = meta["tied_first"]
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if not (name.startswith("layer_") and name.endswith("-model_00-model_states.pt")):
            continue
        idx = int(name[len("layer_"):name.index("-")])
        prefix = f"tied_modules.{tied_at[idx]}." if idx in tied_at else f"{idx}."
        for k, v in _load(os.path.join(path, name)).items():
            out[prefix + k] = v
    return out
