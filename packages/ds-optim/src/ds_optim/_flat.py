"""Flat buffers: one contiguous buffer per (param group, dtype) for params, grads and each optimizer state.

At construction every trainable parameter of a group is copied into its slot of the bucket's flat param buffer
and re-pointed there (``p.data`` becomes a view), so the update of thousands of tensors is one kernel launch
over one buffer instead of one per tensor. Grads get slots in a flat grad buffer: a grad that already *is* its
slot (the usual case after the first step, or with ``zero_grad(set_to_none=False)``) costs nothing; any other
grad (a fresh one after ``zero_grad(set_to_none=True)``, a DDP bucket view) is copied in with one multi-tensor
copy, and, if it is a plain tensor, its parameter's ``.grad`` is re-pointed to the slot so that the next
backward accumulates straight into the flat buffer.

DTensor params (FSDP2's ``fully_shard``, tensor parallelism) get a ``ShardBucket`` instead: their storage is
never re-pointed (FSDP2's all-gather reads the padded shard storage behind ``p._local_tensor``, so a param moved
elsewhere would silently stop training). Their states are flat as above; small shards are staged through
transient flat buffers, large ones updated where they are, see ``ShardBucket``.

Each bucket also keeps a device-resident step counter per parameter (``steps``), so fused GPU backends can
compute bias corrections in the kernel without a host sync, and a host mirror of how many steps each parameter
took (``step_counts``), which decides which parameters can share one launch (same step, grad present).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from . import _dtensor

#: ``(numel, dtype) -> a zero-filled 1-D host tensor``: where a host bucket's flat params and states live
HostAlloc = Callable[[int, torch.dtype], torch.Tensor]


class _Bucket:
    """What both bucket kinds share: slot offsets, flat fp32 states, the step counters, runs."""

    # set by each kind's __init__ before _init_slots
    device: torch.device
    dtype: torch.dtype
    #: CPUAdam's flat 16-bit copy of the params (set by CPUAdam.add_param_group on its buckets only)
    copy_out: torch.Tensor | None

    def _init_slots(self, params: list, numels: list[int], state_names: tuple[str, ...], state_dtype,
                    alloc: HostAlloc | None = None) -> None:
        self.params = params
        self.offsets = [0]
        for n in numels:
            self.offsets.append(self.offsets[-1] + n)
        self.states = {name: (alloc(self.offsets[-1], state_dtype) if alloc is not None
                              else torch.zeros(self.offsets[-1], dtype=state_dtype, device=self.device))
                       for name in state_names}
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self._step_counts = [0] * len(params)
        # Steps taken by every param together, not yet added to _step_counts: the common case (every param has
        # a grad every step) then costs no per-param Python work, which matters with 10,000 tensors.
        self._uniform_steps = 0
        self.states_published = False
        self.index = {p: i for i, p in enumerate(params)}

    @property
    def step_counts(self) -> list[int]:
        """Host mirror of how many steps each param took."""
        if self._uniform_steps:
            self._step_counts = [c + self._uniform_steps for c in self._step_counts]
            self._uniform_steps = 0
        return self._step_counts

    @step_counts.setter
    def step_counts(self, counts: list[int]) -> None:
        self._step_counts, self._uniform_steps = list(counts), 0

    @property
    def uniform(self) -> bool:
        """Whether every param took the same number of steps (one launch covers the bucket)."""
        counts = self._step_counts
        return counts.count(counts[0]) == len(counts)

    def count_uniform_step(self) -> None:
        self._uniform_steps += 1

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def runs(self, present: list[bool]) -> list[tuple[int, int]]:
        """Maximal runs ``[i0, i1)`` of consecutive params that have a grad and the same step count."""
        out, start = [], None
        counts = self.step_counts
        for i, has in enumerate(present):
            if start is not None and (not has or counts[i] != counts[start]):
                out.append((start, i))
                start = None
            if has and start is None:
                start = i
        if start is not None:
            out.append((start, len(present)))
        return out


class FlatBucket(_Bucket):
    """The flat storage of the trainable params of one dtype in one param group. ``alloc``: makes the host
    buckets' flat params and states (zero-filled, 1-D), e.g. page-locked memory for DMA copies; None: torch's."""

    def __init__(self, params: list[torch.nn.Parameter], state_names: tuple[str, ...], state_dtype=torch.float32,
                 alloc: HostAlloc | None = None):
        first = params[0]
        self.device, self.dtype = first.device, first.dtype
        if self.device.type != "cpu":
            alloc = None
        self._init_slots(params, [p.numel() for p in params], state_names, state_dtype, alloc)
        total = self.numel
        self.param_flat = (alloc(total, self.dtype) if alloc is not None
                           else torch.empty(total, dtype=self.dtype, device=self.device))
        self.param_views = []
        with torch.no_grad():
            for p, lo, hi in zip(params, self.offsets, self.offsets[1:]):
                view = self.param_flat[lo:hi].view_as(p)
                view.copy_(p)
                p.data = view
                self.param_views.append(view)
        # The flat grad buffer is made on first use: an optimizer stepped with ``step(grads=...)`` (a ZeRO
        # engine handing in its reduced 16-bit shards) never holds one, which saves a full fp32 copy.
        self._grad_flat: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []

    @property
    def grad_flat(self) -> torch.Tensor:
        if self._grad_flat is None:
            self._grad_flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self._grad_views = [self._grad_flat[lo:hi].view_as(p)
                                for p, lo, hi in zip(self.params, self.offsets, self.offsets[1:])]
        return self._grad_flat

    @property
    def grad_views(self) -> list[torch.Tensor]:
        self.grad_flat  # noqa: B018 - allocates the buffer and its views on first use
        return self._grad_views

    @property
    def holds_grad_buffer(self) -> bool:
        return self._grad_flat is not None

    def flat_of(self, grads: list) -> tuple[torch.Tensor | None, list[bool] | None]:
        """``step(grads=...)``: the bucket's grads as one flat tensor (whatever their floating dtype, the kernels
        read them as they are) and which params have one (``None``: all). A lone contiguous grad is used where
        it is, else the grads are copied into a transient flat of their dtype; the params' ``.grad`` and the
        persistent grad buffer are left alone."""
        present = [g is not None for g in grads]
        if not any(present):
            return None, present
        dtypes = {g.dtype for g in grads if g is not None}
        if len(self.params) == 1 and grads[0].is_contiguous():
            return grads[0].view(-1), None
        dtype = dtypes.pop() if len(dtypes) == 1 else self.dtype
        flat = torch.zeros(self.numel, dtype=dtype, device=self.device)
        pairs = [(flat[lo:hi], g.reshape(-1)) for g, lo, hi in zip(grads, self.offsets, self.offsets[1:])
                 if g is not None]
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        return flat, None if all(present) else present

    def local_shape(self, i: int) -> torch.Size:
        return self.params[i].shape

    def copy_params_to(self, out: torch.Tensor) -> None:
        """Write every param into the flat tensor ``out`` (CPUAdam's first 16-bit copy)."""
        out.copy_(self.param_flat)

    def state_view(self, name: str, i: int) -> torch.Tensor:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.states[name][lo:hi].view_as(self.params[i])

    local_state = state_view

    def gather_grads(self) -> list[bool] | None:
        """Make the flat grad buffer hold every present grad; return which params have one (``None``: all)."""
        grads = [p.grad for p in self.params]
        if self._grad_flat is not None and all(map(operator.is_, grads, self._grad_views)):
            return None
        present = [g is not None for g in grads]
        dst, src = [], []
        for i, g in enumerate(grads):
            if g is None or g is self.grad_views[i]:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    "ds_optim optimizers do not support sparse gradients (parameter of shape "
                    f"{tuple(self.params[i].shape)}); use torch.optim.SparseAdam for sparse embeddings"
                )
            dst.append(self.grad_views[i])
            src.append(g)
            if g._base is None and not g.requires_grad:
                # a plain tensor we may replace: the next backward accumulates into the flat slot
                self.params[i].grad = self.grad_views[i]
        if src:
            torch._foreach_copy_(dst, src)
        return None if all(present) else present

    def zero_grads(self) -> None:
        """``zero_grad(set_to_none=False)``: one fill of the flat grad buffer zeroes every grad living in it;
        grads elsewhere (DDP bucket views) are zeroed in place; ``None`` grads stay ``None``, as in torch."""
        if self._grad_flat is not None:
            self._grad_flat.zero_()
        views = self._grad_views if self._grad_flat is not None else [None] * len(self.params)
        for p, view in zip(self.params, views):
            g = p.grad
            if g is not None and g is not view:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()


class ShardBucket(_Bucket):
    """Trainable DTensor params of one dtype in one param group, stepped in place on their local shards.

    The kernels update contiguous ranges, and a DTensor's local shard lives in storage the optimizer must not
    move (FSDP2's all-gather reads it). The states are flat, as in ``FlatBucket``; the params take one of two
    paths, one per bucket (``direct``), chosen per param from its size:

    - small shards are staged together: their local grads and their params are concatenated into two flat
      buffers (one C++ call each), one kernel call updates the range, and one multi-tensor copy writes the
      params back into the shards. A few launches whatever the number of tensors (biases and norms are many),
      for an extra read and write of the params and the grads. The params are copied in at every step rather
      than kept staged: anything may write them between steps (``model.load_state_dict``, ``p.data.copy_``)
      without the optimizer knowing;
    - large shards (``direct_numel`` padded elements or more), and any shard alone in its range, are updated
      where they are, one kernel call on each shard and its grad: there a call's fixed cost (~30 us of Python
      and launch) is small next to the copies it saves.

    Measured, Adam on FSDP2 shards (one rank): on an H200 with CuPy, 6 shards of 16M elements take 0.8 ms a
    step in place (torch's AdamW: 0.84 ms fused, 2.2 ms foreach, its default); 48 shards of 4M 1.5 ms staged
    and 2.0 ms in place (1.1 fused, 2.2 foreach); 400 of 64K 2.3 ms staged and 17 ms in place (20 fused, 13
    foreach). Hence in place on CUDA from 8M elements. On one CPU core with Numba, 8 shards of 1M elements
    take ~7 ms in place and ~55 ms staged (copies into fresh buffers cost more than the update there): in
    place from 64K elements.

    Staging buffers are transient, at most ``STAGE_NUMEL`` elements each. Sizes are padded local sizes, which
    every rank knows alike: every rank makes the same buckets and cuts the same ranges, so that updates with
    collectives inside (LAMB's whole-tensor norms) stay in step. Empty shards (FSDP2 on more ranks than a
    dim-0 has rows) get empty slots.
    """

    #: most (padded) elements staged per kernel call: 2 x 64 MiB of fp32 staging at most
    STAGE_NUMEL = 1 << 24
    #: per device type, the padded local size from which a shard is updated in place (see above)
    DIRECT_NUMEL = {"cuda": 1 << 23, "cpu": 1 << 16}

    @classmethod
    def direct_numel(cls, device: torch.device) -> int:
        return cls.DIRECT_NUMEL.get(device.type, 1 << 20)

    @classmethod
    def is_large(cls, p) -> bool:
        return _dtensor.padded_local_numel(p) >= cls.direct_numel(_dtensor.local_device(p))

    def __init__(self, params: list, state_names: tuple[str, ...], state_dtype=torch.float32, direct=False):
        first = params[0]
        self.device, self.dtype = first._local_tensor.device, first.dtype  # the shards' device (see local_device)
        self.direct = direct
        self.local_shapes = [p._local_tensor.shape for p in params]
        self._init_slots(params, [s.numel() for s in self.local_shapes], state_names, state_dtype)
        self._padded = [_dtensor.padded_local_numel(p) for p in params]

    def local_shape(self, i: int) -> torch.Size:
        return self.local_shapes[i]

    def local_state(self, name: str, i: int) -> torch.Tensor:
        return self.states[name][self.offsets[i] : self.offsets[i + 1]].view(self.local_shapes[i])

    def state_view(self, name: str, i: int) -> torch.Tensor:
        """The state as torch keeps it for a DTensor param: a DTensor like the param around its flat slot."""
        return _dtensor.like_param(self.local_state(name, i), self.params[i])

    def _local_param(self, i: int) -> torch.Tensor:
        t = self.params[i]._local_tensor
        if t.shape != self.local_shapes[i]:
            raise RuntimeError(
                f"a DTensor param's local shard changed shape since the optimizer was built "
                f"({tuple(self.local_shapes[i])} -> {tuple(t.shape)}); rebuild the optimizer after resharding"
            )
        return t

    def local_grads(self) -> list[torch.Tensor | None]:
        """Each param's local grad (``None`` where it has none)."""
        dtensor = _dtensor.dtensor_class()
        out = []
        for p in self.params:
            g = p.grad
            if g is not None:
                if type(g) is dtensor and g._spec is p._spec:  # FSDP2's grads: the param's own layout
                    g = g._local_tensor
                elif g.is_sparse:
                    raise RuntimeError("ds_optim optimizers do not support sparse gradients")
                else:
                    g = _dtensor.local_grad(p, g)
            out.append(g)
        return out

    def ranges(self, i0: int, i1: int) -> list[tuple[int, int]]:
        """``[i0, i1)`` cut into kernel calls: one per param in a direct bucket, else ranges of at most
        ``STAGE_NUMEL`` padded elements (a larger param alone)."""
        if self.direct:
            return [(i, i + 1) for i in range(i0, i1)]
        out, start, size = [], i0, 0
        for i in range(i0, i1):
            if size and size + self._padded[i] > self.STAGE_NUMEL:
                out.append((start, i))
                start, size = i, 0
            size += self._padded[i]
        out.append((start, i1))
        return out

    def stage(self, i0: int, i1: int, grads: list) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The local params and grads of ``[i0, i1)`` (every one with a grad) as flat tensors, and the shards to
        write back with ``unstage``. A lone contiguous shard is itself (nothing to write back); several are
        copied by ``flatten_dense_tensors`` (one C++ call for the range: no Python per tensor)."""
        shards = [self._local_param(i) for i in range(i0, i1)]
        if len(shards) == 1:
            shard, g = shards[0], grads[i0].reshape(-1)
            if shard.is_contiguous():
                return shard.view(-1), g, []
            return shard.reshape(-1), g, shards  # a copy, to write back
        flatten = torch._utils._flatten_dense_tensors
        return flatten(shards), flatten(grads[i0:i1]), shards

    @staticmethod
    def unstage(p_flat: torch.Tensor, shards: list) -> None:
        """Write the updated params back into their shards, in place."""
        if shards:
            torch._foreach_copy_(shards, torch._utils._unflatten_dense_tensors(p_flat, shards))

    @torch.no_grad()
    def copy_params_to(self, out: torch.Tensor) -> None:
        """Write every local param into the flat tensor ``out`` (CPUAdam's first 16-bit copy)."""
        pairs = [(out[lo:hi].view(shape), self._local_param(i))
                 for i, (lo, hi, shape) in enumerate(zip(self.offsets, self.offsets[1:], self.local_shapes))
                 if hi > lo]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def zero_grads(self) -> None:
        """``zero_grad(set_to_none=False)``: each grad's local tensor zeroed in place (FSDP2 accumulates the
        next step's grads into it); ``None`` grads stay ``None``, as in torch."""
        shards = []
        for p in self.params:
            g = p.grad
            if g is not None:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                shards.append(_dtensor.local(g))
        if shards:
            torch._foreach_zero_(shards)

