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
  ``torch.optim.AdamW`` and ``ds_optim.FusedAdamW``; states stay fp32 whatever the param dtype;
- ``zero_grad()``: ``set_to_none=True`` (torch's default) as torch; ``set_to_none=False`` is one fill per bucket
  and keeps grads in the flat buffers, the zero-copy path.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ._flat import FlatBucket
from .kernels import OptimizerKernels, select_backend


class FlatOptimizer(torch.optim.Optimizer):
    #: optimizer state names, torch's keys
    state_names: tuple[str, ...] = ()
    #: torch.amp.GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], backend: str | None = None):
        self._backend_request = backend
        self._buckets: list[list[FlatBucket]] = []  # per param group
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
        devices = {p.device for p in group["params"]}
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
        trainable = [p for p in group["params"] if p.requires_grad]
        by_dtype: dict[torch.dtype, list] = {}
        for p in trainable:
            by_dtype.setdefault(p.dtype, []).append(p)
        self._buckets.append([FlatBucket(ps, self.state_names) for ps in by_dtype.values() if ps])
        self._loose.append([p for p in group["params"] if not p.requires_grad])
        if devices:
            select_backend(next(iter(devices)), self._backend_request)  # fail early if the backend is missing

    def kernels_for(self, device: torch.device) -> OptimizerKernels:
        return select_backend(device, self._backend_request)

    # -- the step ----------------------------------------------------------------------------------------
    def _update(self, kernels: OptimizerKernels, group: dict[str, Any], p, g, states: dict[str, torch.Tensor],
                step: torch.Tensor, grad_scale, found_inf, out, offsets: list[int]) -> None:
        raise NotImplementedError

    def _out_for(self, bucket: FlatBucket, lo: int, hi: int):
        """A 16-bit copy-out target for this range (CPUAdam), else None."""
        return None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, buckets, loose in zip(self.param_groups, self._buckets, self._loose):
            for bucket in buckets:
                self._step_bucket(group, bucket, grad_scale, found_inf)
            for p in loose:
                if p.grad is not None:
                    self._step_loose(group, p, grad_scale, found_inf)
        return loss

    @staticmethod
    def _advance(steps: torch.Tensor, found_inf) -> None:
        if found_inf is None:
            steps.add_(1)
        else:  # a skipped step is not counted, without reading found_inf on the host
            steps.add_(1 - found_inf.to(steps.device, torch.float32))

    def _step_bucket(self, group, bucket: FlatBucket, grad_scale, found_inf) -> None:
        present = bucket.gather_grads()
        kernels = self.kernels_for(bucket.device)
        if present is None and bucket.uniform:
            # the common case: every param has a grad and the same step count: one launch, no per-param work
            self._advance(bucket.steps, found_inf)
            self._update(kernels, group, bucket.param_flat, bucket.grad_flat, bucket.states, bucket.steps[0],
                         grad_scale, found_inf, self._out_for(bucket, 0, bucket.numel), bucket.offsets)
            bucket.count_uniform_step()
            if not bucket.states_published:
                for i, p in enumerate(bucket.params):
                    self._publish_state(bucket, i, p)
                bucket.states_published = True
            return
        if present is None:
            present = [True] * len(bucket.params)
        if not any(present):
            return
        mask = torch.tensor(present, device=bucket.device)
        increment = torch.where(mask, 1.0, 0.0)
        if found_inf is not None:
            increment = increment * (1 - found_inf.to(bucket.device, torch.float32))
        bucket.steps.add_(increment)
        for i0, i1 in bucket.runs(present):
            lo, hi = bucket.offsets[i0], bucket.offsets[i1]
            states = {name: flat[lo:hi] for name, flat in bucket.states.items()}
            offsets = [o - lo for o in bucket.offsets[i0 : i1 + 1]]
            self._update(kernels, group, bucket.param_flat[lo:hi], bucket.grad_flat[lo:hi], states,
                         bucket.steps[i0], grad_scale, found_inf, self._out_for(bucket, lo, hi), offsets)
        counts = bucket.step_counts
        for i, has in enumerate(present):
            if has:
                counts[i] += 1
                self._publish_state(bucket, i, bucket.params[i])

    def _publish_state(self, bucket: FlatBucket, i: int, p) -> None:
        """torch-style ``state[p]``: views of the flat states, created at the param's first step."""
        if p not in self.state or not self.state[p]:
            self.state[p] = {"step": bucket.steps[i]}
            self.state[p].update({name: bucket.state_view(name, i) for name in self.state_names})

    def _step_loose(self, group, p, grad_scale, found_inf) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for name in self.state_names:
                state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        self._advance(state["step"], found_inf)
        # a frozen param's storage is the user's: run the kernel on contiguous copies and write back
        flat_p = p.detach().reshape(-1).contiguous()
        states = {name: state[name].view(-1) for name in self.state_names}
        self._update(self.kernels_for(p.device), group, flat_p, g.reshape(-1).contiguous(), states,
                     state["step"], grad_scale, found_inf, None, [0, p.numel()])
        if flat_p.data_ptr() != p.data_ptr():
            p.detach().copy_(flat_p.view_as(p))

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
        into ``torch.save``)."""
        sd = super().state_dict()
        sd["state"] = {
            index: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for index, st in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ds-optim or ``torch.optim`` state dict with the same param groups.

        States are copied into the flat buffers in fp32 (torch would cast them to the param dtype) and steps
        into the device-resident step counters.
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
            if p in where:
                bucket, i = where[p]
                with torch.no_grad():
                    for name in self.state_names:
                        bucket.state_view(name, i).copy_(saved[name].reshape(p.shape))
                    bucket.steps[i] = step
                bucket.step_counts[i] = int(step)
                self.state[p] = {"step": bucket.steps[i]}
                self.state[p].update({name: bucket.state_view(name, i) for name in self.state_names})
            else:
                self.state[p] = {"step": torch.tensor(step, dtype=torch.float32, device=p.device)}
                for name in self.state_names:
                    self.state[p][name] = saved[name].to(device=p.device, dtype=torch.float32).reshape(p.shape).clone()
