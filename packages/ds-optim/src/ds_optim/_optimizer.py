"""The base of every ds-optim optimizer: the ``torch.optim.Optimizer`` contract on top of flat buffers.

Subclasses declare their state names (``exp_avg``, ``exp_avg_sq``, ... torch's keys) and implement
``_update(kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets)`` for one contiguous range.
This class owns everything else:

- param groups with per-group hyper-parameters (``add_param_group`` too), validated like torch does;
- flat buckets per (group, dtype) of the trainable params (``_flat.FlatBucket``); params frozen at construction
  (``requires_grad=False``) stay where they are and, should they ever get a grad, are updated one by one;
- ``step()``: gathers grads into the flat buffers, launches one kernel per run of params that share a step
  count, honours ``torch.amp.GradScaler`` (``grad_scale`` / ``found_inf`` read on the device: no sync for the
  fused GPU backends), and counts steps per parameter as torch does;
- ``state_dict()`` / ``load_state_dict()`` with torch's layout and keys, so checkpoints move both ways between
  ``torch.optim.AdamW`` and ``ds_optim.FusedAdamW``; states stay fp32 whatever the param dtype (``_state_dtype``:
  CPUAdam's opt-in bf16 states; a loaded state is cast to it);
- ``zero_grad()``: ``set_to_none=True`` (torch's default) as torch; ``set_to_none=False`` is one fill per bucket
  and keeps grads in the flat buffers, the zero-copy path;
- DTensor params (FSDP2's ``fully_shard``, tensor parallelism): ``_flat.ShardBucket``s, stepped in place on their
  local shards, never re-pointed; their states are DTensors like the params, as ``torch.optim`` keeps them.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from . import _dtensor
from ._flat import FlatBucket, HostAlloc, ShardBucket
from .kernels import OptimizerKernels, select_backend


class FlatOptimizer(torch.optim.Optimizer):
    #: optimizer state names, torch's keys
    state_names: tuple[str, ...] = ()
    #: torch.amp.GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself
    _step_supports_amp_scaling = True
    #: dtype of the optimizer states (CPUAdam sets bf16 per instance, before its params are added)
    _state_dtype: torch.dtype = torch.float32

    #: where host buckets' flat params and states are allocated (``_flat.HostAlloc``; CPUAdam's ``host_alloc``)
    _host_alloc: HostAlloc | None = None

    def __init__(self, params, defaults: dict[str, Any], backend: str | None = None):
        self._backend_request = backend
        self._buckets: list[list[FlatBucket | ShardBucket]] = []  # per param group
        self._loose: list[list[torch.nn.Parameter]] = []  # per param group: frozen at construction
        self._loose_steps: dict[torch.nn.Parameter, int] = {}
        super().__init__(params, defaults)

    # -- construction ---------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for out-of-range hyper-parameters (subclasses extend)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: a Tensor lr is not supported; pass a float")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if "eps" in group and not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if "weight_decay" in group and not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if "betas" in group:
            b1, b2 = group["betas"]
            if not 0.0 <= b1 < 1.0:
                raise ValueError(f"Invalid beta parameter at index 0: {b1}")
            if not 0.0 <= b2 < 1.0:
                raise ValueError(f"Invalid beta parameter at index 1: {b2}")

    def _register_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``'s checks and defaults, without its ``_disable_dynamo``
        wrapper: that wrapper imports ``torch._dynamo`` on first use (1.5-3 s), which is most of an optimizer's
        cold start."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        else:
            params = list(params)
        if params and isinstance(params[0], tuple):  # named parameters, as torch accepts them
            param_group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        param_group["params"] = params
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        if len(params) != len(set(params)):
            raise ValueError(f"{type(self).__name__}: a parameter appears twice in one param group")
        seen = set()
        for group in self.param_groups:
            seen.update(group["params"])
        if not seen.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._register_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        name = type(self).__name__
        devices = {_dtensor.local_device(p) for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"{name}: the params of one param group must be on one device, got {sorted(map(str, devices))}; "
                "put each device's params in its own group"
            )
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"{name}: complex parameters are not supported (shape {tuple(p.shape)})")
            if not p.is_floating_point():
                raise ValueError(f"{name}: parameters must be floating point, got {p.dtype}")
            if p.layout != torch.strided:
                raise ValueError(f"{name}: sparse parameters are not supported")
            if _dtensor.is_dtensor(p):
                _dtensor.check_param(p, name)
        # DTensor params must stay where they are (FSDP2 reads their storage): their own bucket kinds, small
        # shards (staged together) and large ones (updated in place)
        by_kind: dict[tuple[torch.dtype, str], list] = {}
        for p in group["params"]:
            if p.requires_grad:
                kind = ("direct" if ShardBucket.is_large(p) else "staged") if _dtensor.is_dtensor(p) else "flat"
                by_kind.setdefault((p.dtype, kind), []).append(p)
        self._buckets.append([
            FlatBucket(ps, self.state_names, self._state_dtype, alloc=self._host_alloc) if kind == "flat"
            else ShardBucket(ps, self.state_names, self._state_dtype, direct=kind == "direct")
            for (_, kind), ps in by_kind.items()
        ])
        self._loose.append([p for p in group["params"] if not p.requires_grad])
        if devices:
            select_backend(next(iter(devices)), self._backend_request)  # fail early if the backend is missing

    @property
    def backend_request(self) -> str | None:
        """The ``backend=`` this optimizer was built with (None: chosen per device)."""
        return self._backend_request

    def kernels_for(self, device: torch.device) -> OptimizerKernels:
        return select_backend(device, self._backend_request)

    # -- the step ----------------------------------------------------------------------------------------
    def _update(self, kernels: OptimizerKernels, group: dict[str, Any], p, g, states: dict[str, torch.Tensor],
                step: torch.Tensor, grad_scale, found_inf, out, offsets: list[int]) -> None:
        raise NotImplementedError

    def _update_local(self, kernels: OptimizerKernels, group: dict[str, Any], p, g, states, step, grad_scale,
                      found_inf, out, offsets: list[int], params: list) -> None:
        """``_update`` on a flat copy of DTensor local shards (``params``: the DTensor params of the range).

        An elementwise update of a shard is the update of its part of the whole tensor, so this is ``_update``;
        updates that reduce over whole tensors (LAMB's norms) override it. Called with the same ranges, empty
        ones included, on every rank."""
        self._update(kernels, group, p, g, states, step, grad_scale, found_inf, out, offsets)

    def _out_for(self, bucket: FlatBucket | ShardBucket, lo: int, hi: int):
        """A 16-bit copy-out target for this range (CPUAdam), else None."""
        return None

    @torch.no_grad()
    def step(self, closure=None, *, grads=None):
        """One update of every param that has a grad.

        ``grads`` (keyword only, ds-optim's addition to torch's signature): one tensor or ``None`` per param, in
        the order of ``param_groups`` and their ``params``, used instead of the params' ``.grad``. A grad may
        have another floating dtype than its param (bf16 grads for fp32 params: the kernels read them as they
        are, where torch would refuse such a ``.grad``), so a ZeRO engine steps its fp32 masters straight from
        its reduced 16-bit gradient shards, with no fp32 copy and no persistent grad buffer here. ``.grad`` is
        neither read nor written then. Not for DTensor params (their ``.grad`` is their layout's)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        supplied = self._supplied_grads(grads) if grads is not None else None
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, buckets, loose in zip(self.param_groups, self._buckets, self._loose):
            for bucket in buckets:
                if isinstance(bucket, ShardBucket):
                    self._step_shards(group, bucket, grad_scale, found_inf)
                else:
                    mine = None if supplied is None else [supplied.get(p) for p in bucket.params]
                    self._step_bucket(group, bucket, grad_scale, found_inf, mine)
            for p in loose:
                g = p.grad if supplied is None else supplied.get(p)
                if g is not None:
                    self._step_loose(group, p, grad_scale, found_inf, g)
        return loss

    def _supplied_grads(self, grads) -> dict:
        params = [p for group in self.param_groups for p in group["params"]]
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"{type(self).__name__}.step(grads=...): got {len(grads)} grads for {len(params)} params "
                             "(one per param of param_groups, in order; None for a param without a grad)")
        out = {}
        for p, g in zip(params, grads):
            if g is None:
                continue
            if _dtensor.is_dtensor(p) or _dtensor.is_dtensor(g):
                raise ValueError(f"{type(self).__name__}.step(grads=...) does not take DTensor params or grads; "
                                 "set their .grad (FSDP2 does) and call step()")
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if g.numel() != p.numel() or g.device != p.device or not g.is_floating_point():
                # checked for every param before any is stepped: nothing half-applied
                raise ValueError(
                    f"{type(self).__name__}.step(grads=...): a grad of shape {tuple(g.shape)} ({g.dtype}, {g.device}) "
                    f"for a parameter of shape {tuple(p.shape)} on {p.device}; each grad needs the parameter's number "
                    "of elements, its device and a floating dtype"
                )
            out[p] = g
        return out

    @staticmethod
    def _advance(steps: torch.Tensor, found_inf) -> None:
        if found_inf is None:
            steps.add_(1)
        else:  # a skipped step is not counted, without reading found_inf on the host
            steps.add_(1 - found_inf.to(steps.device, torch.float32))

    def _step_bucket(self, group, bucket: FlatBucket, grad_scale, found_inf, supplied=None) -> None:
        if supplied is None:
            present = bucket.gather_grads()
            grad_flat = bucket.grad_flat if present is None or any(present) else None
        else:
            grad_flat, present = bucket.flat_of(supplied)
        kernels = self.kernels_for(bucket.device)
        if present is None and bucket.uniform:
            # the common case: every param has a grad and the same step count: one launch, no per-param work
            self._advance(bucket.steps, found_inf)
            self._update(kernels, group, bucket.param_flat, grad_flat, bucket.states, bucket.steps[0],
                         grad_scale, found_inf, self._out_for(bucket, 0, bucket.numel), bucket.offsets)
            bucket.count_uniform_step()
            if not bucket.states_published:
                for i, p in enumerate(bucket.params):
                    self._publish_state(bucket, i, p)
                bucket.states_published = True
            return
        if present is None:
            present = [True] * len(bucket.params)
        if not any(present) or grad_flat is None:  # grad_flat is None exactly when no param has a grad
            return
        self._advance_present(bucket, present, found_inf)
        for i0, i1 in bucket.runs(present):
            lo, hi = bucket.offsets[i0], bucket.offsets[i1]
            states = {name: flat[lo:hi] for name, flat in bucket.states.items()}
            offsets = [o - lo for o in bucket.offsets[i0 : i1 + 1]]
            self._update(kernels, group, bucket.param_flat[lo:hi], grad_flat[lo:hi], states,
                         bucket.steps[i0], grad_scale, found_inf, self._out_for(bucket, lo, hi), offsets)
        self._count_present(bucket, present, found_inf)

    def _advance_present(self, bucket, present: list[bool], found_inf) -> None:
        mask = torch.tensor(present, device=bucket.device)
        increment = torch.where(mask, 1.0, 0.0)
        if found_inf is not None:
            increment = increment * (1 - found_inf.to(bucket.device, torch.float32))
        bucket.steps.add_(increment)

    def _count_present(self, bucket, present: list[bool], found_inf) -> None:
        # The host counts decide which params share a launch, and with it a step number: a step skipped by
        # GradScaler must not count, or a param that had a grad only then would later share a launch with one
        # a step ahead of it. Reading found_inf syncs, but only when some params lack a grad.
        skipped = found_inf is not None and bool(found_inf)
        counts = bucket.step_counts
        for i, has in enumerate(present):
            if has:
                counts[i] += not skipped
                self._publish_state(bucket, i, bucket.params[i])

    def _step_shards(self, group, bucket: ShardBucket, grad_scale, found_inf) -> None:
        """A ShardBucket's step: one kernel call per range of shards, staged or in place (see ``ShardBucket``)."""
        grads = bucket.local_grads()
        present = [g is not None for g in grads]
        if not any(present):
            return
        uniform = all(present) and bucket.uniform
        if uniform:
            self._advance(bucket.steps, found_inf)
            runs = [(0, len(present))]
        else:
            self._advance_present(bucket, present, found_inf)
            runs = bucket.runs(present)
        kernels = self.kernels_for(bucket.device)
        for i0, i1 in runs:
            for c0, c1 in bucket.ranges(i0, i1):
                lo, hi = bucket.offsets[c0], bucket.offsets[c1]
                p, g, shards = bucket.stage(c0, c1, grads)
                states = {name: flat[lo:hi] for name, flat in bucket.states.items()}
                offsets = [o - lo for o in bucket.offsets[c0 : c1 + 1]]
                self._update_local(kernels, group, p, g, states, bucket.steps[c0], grad_scale, found_inf,
                                   self._out_for(bucket, lo, hi), offsets, bucket.params[c0:c1])
                bucket.unstage(p, shards)
                del p, g  # the staging buffers, before the next range allocates its own
        if not uniform:
            self._count_present(bucket, present, found_inf)
            return
        bucket.count_uniform_step()
        if not bucket.states_published:
            for i, p in enumerate(bucket.params):
                self._publish_state(bucket, i, p)
            bucket.states_published = True

    def _publish_state(self, bucket: FlatBucket | ShardBucket, i: int, p) -> None:
        """torch-style ``state[p]``: views of the flat states (DTensors for DTensor params), created at the
        param's first step."""
        if p not in self.state or not self.state[p]:
            self.state[p] = {"step": bucket.steps[i]}
            self.state[p].update({name: bucket.state_view(name, i) for name in self.state_names})

    def _step_loose(self, group, p, grad_scale, found_inf, g) -> None:
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        sharded = _dtensor.is_dtensor(p)
        # a DTensor is stepped on its local shard, in place
        target = p._local_tensor if sharded else p.detach()
        if sharded:
            g = _dtensor.local_grad(p, g)
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=target.device)
            for name in self.state_names:
                zeros = torch.zeros(target.shape, dtype=self._state_dtype, device=target.device)
                state[name] = _dtensor.like_param(zeros, p) if sharded else zeros
        self._advance(state["step"], found_inf)
        # a frozen param's storage is the user's: run the kernel on contiguous copies and write back
        flat_p = target.reshape(-1).contiguous()
        states = {name: _dtensor.local(state[name]).view(-1) for name in self.state_names}
        args = (self.kernels_for(target.device), group, flat_p, g.reshape(-1).contiguous(), states, state["step"],
                grad_scale, found_inf, None, [0, target.numel()])
        if sharded:
            self._update_local(*args, [p])
        else:
            self._update(*args)
        if flat_p.data_ptr() != target.data_ptr():
            target.copy_(flat_p.view_as(target))

    def flat_buffers(self) -> dict[str, list[torch.Tensor]]:
        """The flat storage this optimizer holds behind its params' views: ``"grads"`` (the flat grad buffers
        allocated so far: none for an optimizer stepped only through ``step(grads=...)``) and ``"states"``
        (the states, fp32 or CPUAdam's bf16). For memory accounting; the tensors are the live buffers, not copies."""
        out: dict[str, list[torch.Tensor]] = {"grads": [], "states": []}
        for buckets in self._buckets:
            for bucket in buckets:
                if isinstance(bucket, FlatBucket) and bucket.holds_grad_buffer:
                    out["grads"].append(bucket.grad_flat)
                out["states"].extend(bucket.states.values())
        return out

    # -- zero_grad ---------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:  # as torch's, without its dynamo-disabling wrapper (see _register_group)
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        for buckets, loose in zip(self._buckets, self._loose):
            for bucket in buckets:
                bucket.zero_grads()
            for p in loose:
                if p.grad is not None:
                    p.grad.detach_()
                    p.grad.zero_()

    # -- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout and keys; tensors are copies (views of the flat buffers would drag whole buffers
        into ``torch.save``). States of DTensor params are DTensors like the params (local copies)."""
        sd = super().state_dict()
        sd["state"] = {
            index: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for index, st in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ds-optim or ``torch.optim`` state dict with the same param groups.

        States are copied into the flat buffers in the state dtype, fp32 (torch would cast them to the param
        dtype) or CPUAdam's bf16 (rounded to nearest even; bf16 into fp32 is exact), and steps
        into the device-resident step counters. For a DTensor param a state may be a DTensor (redistributed to
        the param's placements if laid out otherwise), the full tensor or the local shard.
        """
        saved_groups = state_dict["param_groups"]
        originals = state_dict["state"]
        for name in ("amsgrad",):
            if any(g.get(name) for g in saved_groups):
                raise ValueError(f"{type(self).__name__}: cannot load a state dict saved with {name}=True")
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch.optim state dict lacks our own keys (adam_w_mode, ...)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._validate_group(group)
        id_to_param = dict(zip(
            itertools.chain.from_iterable(g["params"] for g in saved_groups),
            itertools.chain.from_iterable(g["params"] for g in self.param_groups),
        ))
        where = {}
        for buckets in self._buckets:
            for bucket in buckets:
                for i, p in enumerate(bucket.params):
                    where[p] = (bucket, i)
        for index, saved in originals.items():
            p = id_to_param[index]
            missing = [n for n in self.state_names if n not in saved]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state of parameter {index} lacks {missing} "
                    f"(has {sorted(saved)}); was it saved by another optimizer type?"
                )
            step = float(saved.get("step", 0))
            sharded = _dtensor.is_dtensor(p)
            shape = p._local_tensor.shape if sharded else p.shape
            values = {name: self._loadable(saved[name], p, sharded) for name in self.state_names}
            if p in where:
                bucket, i = where[p]
                with torch.no_grad():
                    for name in self.state_names:
                        bucket.local_state(name, i).copy_(values[name].reshape(shape))
                    bucket.steps[i] = step
                bucket.step_counts[i] = int(step)
                self.state[p] = {"step": bucket.steps[i]}
                self.state[p].update({name: bucket.state_view(name, i) for name in self.state_names})
            else:
                device = _dtensor.local_device(p)
                self.state[p] = {"step": torch.tensor(step, dtype=torch.float32, device=device)}
                for name in self.state_names:
                    value = values[name].to(device=device, dtype=self._state_dtype).reshape(shape).clone()
                    self.state[p][name] = _dtensor.like_param(value, p) if sharded else value

    @staticmethod
    def _loadable(value: torch.Tensor, p, sharded: bool) -> torch.Tensor:
        """A saved state as a plain tensor laid out like ``p`` (its local shard for a DTensor param)."""
        if sharded:
            return _dtensor.local_value(value, p)
        if _dtensor.is_dtensor(value):  # a sharded checkpoint into a plain param: the whole tensor
            return value.full_tensor()
        return value
