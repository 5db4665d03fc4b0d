"""Flat buffers: one contiguous buffer per (param group, dtype) for params, grads and each optimizer state.

At construction every trainable parameter of a group is copied into its slot of the bucket's flat param buffer
and re-pointed there (``p.data`` becomes a view), so the update of thousands of tensors is one kernel launch
over one buffer instead of one per tensor. Grads get slots in a flat grad buffer: a grad that already *is* its
slot (the usual case after the first step, or with ``zero_grad(set_to_none=False)``) costs nothing; any other
grad (a fresh one after ``zero_grad(set_to_none=True)``, a DDP bucket view) is copied in with one multi-tensor
copy, and, if it is a plain tensor, its parameter's ``.grad`` is re-pointed to the slot so that the next
backward accumulates straight into the flat buffer.

Each bucket also keeps a device-resident step counter per parameter (``steps``), so fused GPU backends can
compute bias corrections in the kernel without a host sync, and a host mirror of how many steps each parameter
took (``step_counts``), which decides which parameters can share one launch (same step, grad present).
"""

from __future__ import annotations

import operator

import torch


class FlatBucket:
    """The flat storage of the trainable params of one dtype in one param group."""

    def __init__(self, params: list[torch.nn.Parameter], state_names: tuple[str, ...], state_dtype=torch.float32):
        self.params = params
        first = params[0]
        self.device, self.dtype = first.device, first.dtype
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        total = self.offsets[-1]
        self.param_flat = torch.empty(total, dtype=self.dtype, device=self.device)
        self.grad_flat = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.param_views, self.grad_views = [], []
        with torch.no_grad():
            for p, lo, hi in zip(params, self.offsets, self.offsets[1:]):
                view = self.param_flat[lo:hi].view_as(p)
                view.copy_(p)
                p.data = view
                self.param_views.append(view)
                self.grad_views.append(self.grad_flat[lo:hi].view_as(p))
        self.states = {name: torch.zeros(total, dtype=state_dtype, device=self.device) for name in state_names}
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

    def state_view(self, name: str, i: int) -> torch.Tensor:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.states[name][lo:hi].view_as(self.params[i])

    def gather_grads(self) -> list[bool] | None:
        """Make the flat grad buffer hold every present grad; return which params have one (``None``: all)."""
        grads = [p.grad for p in self.params]
        if all(map(operator.is_, grads, self.grad_views)):
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

    def zero_grads(self) -> None:
        """``zero_grad(set_to_none=False)``: one fill of the flat grad buffer zeroes every grad living in it;
        grads elsewhere (DDP bucket views) are zeroed in place; ``None`` grads stay ``None``, as in torch."""
        self.grad_flat.zero_()
        for p, view in zip(self.params, self.grad_views):
            g = p.grad
            if g is not None and g is not view:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()
