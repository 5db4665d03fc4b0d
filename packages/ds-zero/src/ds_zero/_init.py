"""Construction-time partitioning (DeepSpeed's ``deepspeed.zero.Init``) and ``GatheredParameters``.

``Init``: inside the context every parameter a module registers is replaced by a *meta* tensor of the same
shape (buffers stay real), so building the model allocates nothing for its params. The stage-3 engine then
shards the meta model with ``fully_shard`` and materialises it one module at a time: the module's own params
are built whole on the CPU, initialised by ``reset_parameters()`` (or ``Init(param_init_fn=...)``), this rank's
rows are copied into its shard, and the whole copies are dropped. Peak memory is this rank's shards plus one
module's params, never the model. The initialisers are replayed in registration order from the RNG state
captured when the context was entered, identically on every rank, so the result equals building the model
eagerly on the CPU with the same seed, whenever its initialisation lives in ``reset_parameters`` (every torch
layer) or in ``param_init_fn``. A module with params and neither is refused by name rather than left
uninitialised.

``GatheredParameters(params, modifier_rank)``: inside the context the given stage-3 params are whole on every
rank (the module attribute is a full fp32 ``Parameter``); on exit, when ``modifier_rank`` is set, that rank's
values are broadcast and written back into every rank's shard (and the persistent params' fp32 masters).
Params that are not partitioned are left alone, as DeepSpeed does.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, cast

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from .engine import ZeroEngine

__all__ = ["Init", "GatheredParameters"]


@dataclass
class _InitRecord:
    rng_at_enter: torch.Tensor
    rng_at_exit: torch.Tensor | None
    param_init_fn: Callable[[nn.Module], None] | None


# Marks are attributes of the tensors themselves (a WeakKeyDictionary would compare tensors by value):
#: on a meta param built under Init: its _InitRecord
_INIT_MARK = "_ds_zero_init_record"
#: on a stage-3 param: weak references to (owning module, attribute name, engine)
_OWNER_MARK = "_ds_zero_owner"


def _owner(p):
    refs = getattr(p, _OWNER_MARK, None)
    if refs is None:
        return None
    module, name, engine = refs[0](), refs[1], refs[2]()
    return None if module is None or engine is None else (module, name, engine)


class Init(contextlib.ContextDecorator):
    """Build a model whose params are never materialised whole (see the module docstring).

    ``with ds_zero.Init(): model = MyModel()``, then hand the model to a stage-3 engine (``ds_train.initialize``
    or ``ZeroEngine``), which materialises it sharded. DeepSpeed's arguments are accepted where they have a
    meaning here; ``remote_device`` other than ``None``/``"none"``, ``module=`` (partitioning an existing module)
    and ``enabled=False`` with params... are explained when refused.

    Args:
        param_init_fn: ``module -> None`` initialising the module's *own* params in place (called instead of
            ``reset_parameters``); the ds-zero equivalent of FSDP1's ``param_init_fn``.
        enabled: ``False`` builds the model normally (DeepSpeed's switch).
        config_dict_or_path, config, dtype, mpu, data_parallel_group, pin_memory, mem_efficient_linear: DeepSpeed's;
            accepted and unused (the engine takes the config and group; the dtype follows its fp16/bf16 section).
    """

    def __init__(self, module: nn.Module | None = None, data_parallel_group=None, mem_efficient_linear: bool = True,
                 remote_device: str | None = None, pin_memory: bool = False, config_dict_or_path=None, config=None,
                 enabled: bool = True, dtype=None, mpu=None, param_init_fn: Callable[[nn.Module], None] | None = None,
                 **unsupported) -> None:
        if unsupported:
            raise TypeError(f"ds_zero.Init: unsupported arguments {sorted(unsupported)} (ZeRO++ quantized weights and "
                            "parameter swapping are not built)")
        if module is not None:
            raise ValueError("ds_zero.Init(module=...) (partitioning an already built module) is not supported: "
                             "hand the module to the stage-3 engine, which shards it at construction")
        if remote_device not in (None, "none"):
            # where the shards live is the engine's decision (its config), made when it materialises the model
            raise ValueError(f"ds_zero.Init(remote_device={remote_device!r}): Init's own offload is not built; "
                             "set zero_optimization.offload_param: {\"device\": \"cpu\"} in the engine config "
                             "instead (the engine then makes the shards on the CPU)")
        if param_init_fn is not None and not callable(param_init_fn):
            raise TypeError(f"param_init_fn must be callable, got {type(param_init_fn).__name__}")
        self.enabled = enabled
        self.param_init_fn = param_init_fn
        self._record: _InitRecord | None = None
        self._original: Callable[[nn.Module, str, nn.Parameter | None], None] | None = None

    def __enter__(self):
        if not self.enabled:
            return self
        record = _InitRecord(torch.get_rng_state(), None, self.param_init_fn)
        self._record = record
        original = nn.Module.register_parameter
        self._original = original

        def register_parameter(module, name, param):
            if param is not None and not param.is_meta:
                meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
                setattr(meta, _INIT_MARK, record)
                param = meta
            return original(module, name, param)

        # setattr: a class attribute patched for the block (its type is a method, which cannot be assigned)
        setattr(nn.Module, "register_parameter", register_parameter)
        return self

    def __exit__(self, *exc) -> Literal[False]:
        if self.enabled:
            setattr(nn.Module, "register_parameter", self._original)
            if self._record is not None:  # set by __enter__
                self._record.rng_at_exit = torch.get_rng_state()
        return False


def needs_materialisation(model: nn.Module) -> bool:
    """Whether ``model`` has meta params; raises if some of them were not built under ``Init``."""
    meta = [(n, p) for n, p in model.named_parameters() if p.is_meta]
    if not meta:
        return False
    foreign = [n for n, p in meta if not hasattr(p, _INIT_MARK)]
    if foreign:
        raise ValueError(f"parameters {foreign[:5]} are on the meta device but were not built under ds_zero.Init(); "
                         "build the model inside `with ds_zero.Init():` or on a real device")
    return True


def init_records(model: nn.Module) -> dict[nn.Parameter, _InitRecord]:
    """The Init record of every meta param, before ``fully_shard`` replaces the param objects."""
    return {p: getattr(p, _INIT_MARK) for p in model.parameters() if p.is_meta}


@torch.no_grad()
def materialise(model: nn.Module, records_by_name: dict[str, _InitRecord], device: torch.device,
                rows_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """After ``fully_shard`` on the meta model and ``to_empty``: fill every shard (see the module docstring).

    ``records_by_name``: param name -> its Init record; ``rows_of(full, local)``: this rank's rows of ``full``.
    """
    records = {id(r): r for r in records_by_name.values()}
    if len(records) > 1:
        raise ValueError(f"the model's parameters were built under {len(records)} separate ds_zero.Init() blocks; "
                         "build the model inside one (its initialisers are replayed from that block's RNG state)")
    record = next(iter(records.values()))
    names: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(p, name)
    done = set()
    rng_before = torch.get_rng_state()
    torch.set_rng_state(record.rng_at_enter)
    try:
        # children before parents: a parent's reset_parameters runs at the end of its __init__, after its
        # children were built, and may set their params (nn.MultiheadAttention sets out_proj.bias)
        for mod_name, module in _post_order(model):
            own = [(n, p) for n, p in module._parameters.items() if p is not None
                   and p in names and names[p] in records_by_name]
            if not own:
                continue
            init_fn = record.param_init_fn
            has_init = init_fn is not None or callable(getattr(module, "reset_parameters", None))
            if all(p in done for _, p in own) and not has_init:
                continue  # only tied params, initialised with their first owner
            if not has_init:
                cls = type(module).__name__
                if type(module).__bases__[0].__name__ == "FSDPModule":  # fully_shard's FSDP<Class> subclass
                    cls = type(module).__bases__[1].__name__
                raise ValueError(f"module {mod_name or '<root>'!r} ({cls}) has parameters "
                                 f"{[n for n, _ in own]} built under ds_zero.Init but no reset_parameters() to "
                                 "initialise them; pass ds_zero.Init(param_init_fn=fn), fn(module) initialising a "
                                 "module's own params")
            # every own param gets a whole temporary, already initialised ones (tied weights) too: the initialiser
            # then draws the same random numbers as eagerly, and only the not yet initialised ones are kept
            sharded = {}
            for n, p in own:
                sharded[n] = p
                module._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
            try:
                (init_fn or type(module).reset_parameters)(module)
                for n, p in own:
                    if p in done:
                        continue
                    full = module._parameters[n].data
                    local = p._local_tensor if hasattr(p, "_local_tensor") else p.data
                    local.copy_(rows_of(full, local) if hasattr(p, "_local_tensor") else full)
                    done.add(p)
            finally:
                for n, p in sharded.items():
                    module._parameters[n] = p
        rng_after = torch.get_rng_state()
    finally:
        torch.set_rng_state(rng_before)
    if record.rng_at_exit is not None and torch.equal(rng_before, record.rng_at_exit):
        # nothing random ran since the Init block: continue where eager construction would have left the RNG
        torch.set_rng_state(rng_after)


def _post_order(model: nn.Module, prefix: str = ""):
    for name, child in model.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), model


def register_engine_params(engine, model: nn.Module) -> None:
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                setattr(p, _OWNER_MARK, (weakref.ref(module), name, weakref.ref(engine)))


class GatheredParameters(contextlib.ContextDecorator):
    """DeepSpeed's ``deepspeed.zero.GatheredParameters`` for ds-zero's stage 3 (see the module docstring).

    Every rank of the engine's group must enter it with the same params (it is collective). ``fwd_module`` is
    accepted for DeepSpeed compatibility and unused.
    """

    def __init__(self, params, modifier_rank: int | None = None, fwd_module=None, enabled: bool = True) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is None:
            params = []
        self.params = list(dict.fromkeys(params))
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        #: (module, attribute, the engine's param, the one the block sees, the engine)
        self._swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter, ZeroEngine]] = []
        from torch.distributed.tensor import DTensor

        for p in self.params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"GatheredParameters takes parameters, got {type(p).__name__}")
            if isinstance(p, DTensor) and _owner(p) is None:
                raise ValueError(f"GatheredParameters: a DTensor parameter of shape {tuple(p.shape)} that belongs to "
                                 "no ds-zero stage-3 engine (shard it through the engine, or gather it yourself "
                                 "with full_tensor())")

    def __enter__(self):
        if not self.enabled:
            return self
        from torch.distributed.tensor import DTensor

        for engine in {id(o[2]): o[2] for o in map(_owner, self.params) if o is not None}.values():
            engine.policy.reshard()  # the module attributes are the sharded params again
        for p in self.params:
            owner = _owner(p)
            if owner is None:
                continue  # not partitioned: nothing to gather (DeepSpeed's behaviour)
            module, name, engine = owner
            if isinstance(p, DTensor):
                full = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = full
                # p: the engine's DTensor parameter (an nn.Parameter, which the isinstance above narrowed away)
                self._swapped.append((module, name, cast(nn.Parameter, p), full, engine))
            else:  # a persistent param: already whole, its master must follow modifications
                self._swapped.append((module, name, p, p, engine))
        return self

    def __exit__(self, *exc) -> Literal[False]:
        if not self.enabled:
            return False
        swapped, self._swapped = self._swapped, []
        try:
            if self.modifier_rank is not None and exc[0] is None:
                for module, name, original, full, engine in swapped:
                    group = engine.process_group
                    if engine.distributed and engine.dp_world_size > 1:
                        src = self.modifier_rank
                        if group is not None:
                            src = dist.get_global_rank(group, src)
                        dist.broadcast(full.data, src=src, group=group)
                    with torch.no_grad():
                        if full is original:
                            engine._refresh_persistent_master(original)
                        else:
                            local = cast("DTensor", original)._local_tensor  # a sharded param
                            local.copy_(engine._rows_of(full.data.to(local.dtype), local))
        finally:
            for module, name, original, full, engine in swapped:
                module._parameters[name] = original
        return False
